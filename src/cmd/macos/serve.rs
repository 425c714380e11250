//! `serve` on macOS: the XPC server on the original broker's Mach service, with vmnet
//! networks (docs/macos.md). launchd starts it on demand (contrib/macos).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::info;
use vmnet_broker::backend::macos::MacosBackend;
use vmnet_broker::backend::macos::server::{XpcServerOptions, serve};
use vmnet_broker::config::{ConfigDir, DEFAULT_CONFIG_DIR};
use vmnet_broker::policy::SystemDirectory;
use vmnet_broker::registry::Registry;
use vmnet_broker::xpc::{MACH_SERVICE, SERVICE_ENV};

#[derive(clap::Args)]
pub struct Args {
    /// The Mach service to listen on (launchd's plist must name it).
    #[arg(long, env = SERVICE_ENV, default_value = MACH_SERVICE, value_name = "NAME")]
    service: String,
    /// Drop-in network definitions (*.json).
    #[arg(long, default_value = DEFAULT_CONFIG_DIR, value_name = "DIR")]
    config_dir: PathBuf,
    /// Seconds an unused network is kept before it is removed.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    idle_timeout: f64,
    /// Exit when no client has been connected for this many seconds; launchd starts the
    /// broker again on the next connection. The networks are removed on that exit.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    exit_on_idle: f64,
    /// error, warn, info, debug or trace (or a tracing filter such as `vmnet_broker=debug`).
    #[arg(
        long,
        env = "VMNET_BROKER_LOG",
        default_value = "info",
        value_name = "LEVEL"
    )]
    log_level: String,
}

/// The longest timeout accepted: a year (longer ones overflow when added to the time).
const MAX_SECONDS: f64 = 31_536_000.0;

fn seconds(what: &str, s: f64) -> Result<Duration, String> {
    if s > MAX_SECONDS {
        return Err(format!(
            "--{what} {s}: too long, at most {MAX_SECONDS} seconds (a year)"
        ));
    }
    Duration::try_from_secs_f64(s).map_err(|_| format!("--{what} {s}: not a number of seconds"))
}

pub fn main(args: Args) -> super::Result {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|e| format!("--log-level {:?}: {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let idle = seconds("idle-timeout", args.idle_timeout)?;
    let exit_on_idle = seconds("exit-on-idle", args.exit_on_idle)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        info!(config_dir = %args.config_dir.display(), idle_timeout = idle.as_secs_f64(), "starting");
        let registry = Registry::new(
            MacosBackend,
            ConfigDir::new(args.config_dir),
            Box::new(SystemDirectory),
            idle,
        );
        serve(
            registry,
            XpcServerOptions {
                service: args.service,
                exit_on_idle: Some(exit_on_idle),
            },
        )
        .await
        .map_err(|e| vmnet_broker::error::chain(&e))?;
        Ok::<_, Box<dyn std::error::Error>>(ExitCode::SUCCESS)
    })
}
