//! Logging: JSON lines in a cluster (`--log-format json`), readable text on a
//! terminal; the level from `RUST_LOG` (default `info`).

/// Logging flags shared by every binary.
#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Log format: text or json.
    #[arg(long, env = "SECKILL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,
}

/// Installs the global subscriber; a second call does nothing.
pub fn init(args: &TelemetryArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if args.log_format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
