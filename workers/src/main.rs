//! `seckill-worker`: the command, query and projector roles.

use clap::{Parser, Subcommand};
use seckill_workers::{allocator, command, projector, query, telemetry};

/// mimalloc rather than the system allocator: a request makes a few dozen
/// small allocations (the HTTP stack's headers, extensions and boxed
/// futures), and glibc's malloc and free were about a sixth of the
/// instructions of a sold-out answer (docs/BENCHMARKS.md); called through
/// its plain entry points where it can be ([`allocator`]).
#[global_allocator]
static ALLOCATOR: allocator::Mimalloc = allocator::Mimalloc;

#[derive(Parser, Debug)]
#[command(
    name = "seckill-worker",
    version,
    about = "seckill command, query and projector workers"
)]
struct Cli {
    #[command(flatten)]
    telemetry: telemetry::TelemetryArgs,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// Serve the grab endpoint (and, unless disabled, the query endpoints) over HTTP.
    Command(command::CommandArgs),
    /// Serve the query endpoints over HTTP from the read models.
    Query(query::QueryArgs),
    /// Apply the promotion streams to the read models (or rebuild them).
    Projector(projector::ProjectorArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.telemetry);
    let runtime = match seckill_workers::runtime::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seckill-worker: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: Result<(), Box<dyn std::error::Error>> = runtime.block_on(async {
        match cli.role {
            Role::Command(args) => command::run(args).await.map_err(Into::into),
            Role::Query(args) => query::run(args).await.map_err(Into::into),
            Role::Projector(args) => projector::run(args).await.map_err(Into::into),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "seckill-worker stopped on an error");
            eprintln!("seckill-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
