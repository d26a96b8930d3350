//! `seckill`: the all-in-one binary. `seckill up` runs the operator core on
//! Promotion manifest files plus command, query and projector workers in one
//! process; `seckill load` is the flash-crowd load generator. Built on the
//! `seckill-operator` and `seckill-workers` libraries; nothing of it runs in
//! the cluster.
//!
//! Module map:
//! - [`up`]: `seckill up`, the whole system in one process, with its live table.
//! - [`manifests`]: Promotion manifests read from files, checked as the CRD would.
//! - [`load`]: `seckill load`, a flash crowd and the verification of its outcome.

mod load;
mod manifests;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "seckill",
    version,
    about = "seckill all-in-one and load generator"
)]
struct Cli {
    #[command(flatten)]
    telemetry: seckill_workers::telemetry::TelemetryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator core on manifest files plus the workers, in one process.
    Up(Box<up::UpArgs>),
    /// Send a flash crowd at a promotion and verify the outcome.
    Load(load::LoadArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Up(_)) {
        // On a terminal the live table owns the screen: only warnings are logged.
        if std::io::IsTerminal::is_terminal(&std::io::stdout())
            && std::env::var_os("RUST_LOG").is_none()
        {
            std::env::set_var("RUST_LOG", "warn");
        }
        seckill_workers::telemetry::init(&cli.telemetry);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seckill: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Up(args) => match runtime.block_on(up::run(*args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("seckill up: {e}");
                std::process::ExitCode::FAILURE
            }
        },
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
