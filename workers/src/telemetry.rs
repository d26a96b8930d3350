//! Logging: JSON lines in a cluster (`--log-format json`), readable text on a
//! terminal; the level from `RUST_LOG` (default `info`).

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Readable lines, colored on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for a log pipeline.
    Json,
}

/// Logging flags shared by every binary.
#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "SECKILL_LOG_FORMAT", value_enum, default_value_t = LogFormat::default(), global = true)]
    pub log_format: LogFormat,
}

/// Installs the global subscriber; a second call does nothing.
pub fn init(args: &TelemetryArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
