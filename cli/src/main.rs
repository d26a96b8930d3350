//! `seckill`: the all-in-one binary. `seckill up` runs the operator core on
//! Promotion manifest files plus command, query and projector workers in one
//! process; `seckill load` is the flash-crowd load generator; `seckill new
//! promotion` prints a manifest that opens a given time from now. Built on
//! the `seckill-operator` and `seckill-workers` libraries; nothing of it runs
//! in the cluster.
//!
//! Module map:
//! - [`up`]: `seckill up`, the whole system in one process, with its live table.
//! - [`manifests`]: Promotion manifests read from files, checked as the CRD would.
//! - [`load`]: `seckill load`, a flash crowd and the verification of its outcome.
//! - [`timeline`]: what `seckill load` saw, per interval, for its report.
//! - [`report`]: `seckill load --report`, that timeline as one HTML page of SVG plots.
//! - [`new`]: `seckill new promotion`, a manifest checked by the CRD's rules.

mod load;
mod manifests;
mod new;
mod report;
mod timeline;
mod up;

use clap::{Parser, Subcommand};

/// mimalloc, as in `seckill-worker` (see its main): the same HTTP stack
/// serves grabs here.
#[global_allocator]
static ALLOCATOR: seckill_workers::allocator::Mimalloc = seckill_workers::allocator::Mimalloc;

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
    /// Print a manifest for `kubectl apply -f -` (or `seckill up -f`).
    #[command(subcommand)]
    New(new::NewCommand),
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
    if let Command::New(new) = &cli.command {
        return match new::run(new) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("seckill new: {e}");
                std::process::ExitCode::FAILURE
            }
        };
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
        Command::New(_) => std::process::ExitCode::SUCCESS,
    }
}
