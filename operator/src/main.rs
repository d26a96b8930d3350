//! `seckill-operator`: `run` (the default) reconciles Promotions; `crd`
//! prints the CustomResourceDefinition.

use clap::{Parser, Subcommand};
use seckill_operator::controller::{self, RunArgs};
use seckill_workers::telemetry;

#[derive(Parser, Debug)]
#[command(
    name = "seckill-operator",
    version,
    about = "seckill Promotion operator"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    telemetry: telemetry::TelemetryArgs,
    #[command(subcommand)]
    command: Option<Command>,
    /// Flags of `run`, the default subcommand.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reconcile Promotions (the default).
    Run(Box<RunArgs>),
    /// Print the Promotion CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Crd) => {
            return match seckill_operator::crdgen::crd_yaml() {
                Ok(yaml) => {
                    print!("{yaml}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("seckill-operator: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Some(Command::Run(args)) => *args,
        None => cli.run,
    };
    telemetry::init(&cli.telemetry);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seckill-operator: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(controller::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "seckill-operator stopped on an error");
            eprintln!("seckill-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
