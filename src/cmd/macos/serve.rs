//! `serve` on macOS: the XPC server on the original broker's Mach service, with vmnet
//! networks (docs/macos.md). launchd starts it on demand (contrib/macos).

use std::path::PathBuf;
use std::process::ExitCode;
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

pub fn main(args: Args) -> super::Result {
    super::init_logging(&args.log_level, super::LogFormat::Auto)?;
    let idle = super::seconds("idle-timeout", args.idle_timeout)?;
    let exit_on_idle = super::seconds("exit-on-idle", args.exit_on_idle)?;
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
