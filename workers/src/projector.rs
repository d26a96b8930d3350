//! STUB: to be written by its owner.

/// Flags of `seckill-worker projector`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProjectorArgs {}

/// Runs the role until SIGTERM.
pub async fn run(_args: ProjectorArgs) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("projector: not built yet"))
}
