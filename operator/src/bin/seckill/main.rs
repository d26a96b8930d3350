//! `seckill`: the all-in-one binary. `seckill up` runs the operator core on
//! Promotion manifest files plus command, query and projector workers in one
//! process; `seckill load` is the flash-crowd load generator.

mod load;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "seckill", version, about = "seckill all-in-one and load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send a flash crowd at a promotion and verify the outcome.
    Load(load::LoadArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seckill: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Load(args) => match runtime.block_on(load::run(args)) {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => std::process::ExitCode::from(1),
            Err(e) => {
                eprintln!("seckill load: {e}");
                std::process::ExitCode::from(2)
            }
        },
    }
}
