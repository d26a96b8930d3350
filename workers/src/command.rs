//! STUB: to be written by its owner.

/// Flags of `seckill-worker command`.
#[derive(clap::Args, Debug, Clone)]
pub struct CommandArgs {}

/// Runs the role until SIGTERM.
pub async fn run(_args: CommandArgs) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("command: not built yet"))
}
