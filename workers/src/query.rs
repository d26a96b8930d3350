//! STUB: to be written by its owner.

/// Flags of `seckill-worker query`.
#[derive(clap::Args, Debug, Clone)]
pub struct QueryArgs {}

/// Runs the role until SIGTERM.
pub async fn run(_args: QueryArgs) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("query: not built yet"))
}
