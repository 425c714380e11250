use std::path::PathBuf;
use std::process::ExitCode;
use tracing::{info, warn};
use vmnet_broker::backend::Backend;
use vmnet_broker::backend::linux::{LinuxBackend, LinuxOptions};
use vmnet_broker::config::{ConfigDir, DEFAULT_CONFIG_DIR};
use vmnet_broker::policy::SystemDirectory;
use vmnet_broker::protocol::{DEFAULT_SOCKET, SOCKET_ENV};
use vmnet_broker::registry::Registry;
use vmnet_broker::server::{ServerOptions, serve};
use vmnet_broker::state;
use vmnet_broker::systemd::Notifier;

#[derive(clap::Args)]
pub struct Args {
    /// Where to listen. Under socket activation (LISTEN_FDS) the passed socket is served
    /// instead and this path only names it in logs.
    #[arg(long, env = SOCKET_ENV, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Drop-in network definitions (*.json).
    #[arg(long, default_value = DEFAULT_CONFIG_DIR, value_name = "DIR")]
    config_dir: PathBuf,
    /// Seconds an unused network is kept before it is removed.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    idle_timeout: f64,
    /// Exit when no client has been connected for this many seconds, for a supervisor that
    /// starts the broker on demand. The networks are removed on that exit.
    #[arg(long, value_name = "SECONDS")]
    exit_on_idle: Option<f64>,
    /// Where DHCP leases and the record of the broker's networks (broker-state.json) are
    /// kept across restarts: a restarted broker adopts the networks recorded there.
    #[arg(long, default_value = "/var/lib/vmnet-broker", value_name = "DIR")]
    state_dir: PathBuf,
    /// Upstream resolvers for the networks' DNS servers.
    #[arg(long, default_value = "/etc/resolv.conf", value_name = "FILE")]
    resolv_conf: PathBuf,
    /// error, warn, info, debug or trace (or a tracing filter such as `vmnet_broker=debug`).
    #[arg(
        long,
        env = "VMNET_BROKER_LOG",
        default_value = "info",
        value_name = "LEVEL"
    )]
    log_level: String,
    /// This host's identity, mixed into the guest MACs suggested on networks that span
    /// hosts (vxlan) so that hosts never suggest the same MAC. Defaults to /etc/machine-id,
    /// else the host name; set it when several brokers share one machine-id (containers,
    /// network namespaces of one machine).
    #[arg(long, env = "VMNET_BROKER_HOST_ID", value_name = "TEXT")]
    host_id: Option<String>,
    /// auto: journald when stderr is the journal stream systemd names in JOURNAL_STREAM, text otherwise.
    #[arg(long, value_enum, default_value_t = super::LogFormat::Auto, value_name = "FORMAT")]
    log_format: super::LogFormat,
    /// Rewrite this file with the metrics (OpenMetrics text, as `vmnet-broker metrics`
    /// prints) every --metrics-interval seconds, atomically: for node-exporter's textfile
    /// collector (a *.prom file in its directory).
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    /// Seconds between rewrites of --metrics-file.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    metrics_interval: f64,
    /// TAPs kept ready per active network, so that an acquire attaches one instead of
    /// making it (docs/design.md, the TAP pool); 0 turns the pool off. Each waits as a
    /// port of the network's bridge, owned by the broker, passing no frame.
    #[arg(long, default_value_t = vmnet_broker::backend::linux::pool::POOL_SIZE as u16,
          value_parser = clap::value_parser!(u16).range(0..=64), value_name = "N")]
    tap_pool: u16,
}

/// The text this host's identity derives from: `--host-id`, else /etc/machine-id, else
/// the host name.
fn host_identity(given: Option<String>) -> String {
    if let Some(text) = given.filter(|t| !t.trim().is_empty()) {
        return text;
    }
    match std::fs::read_to_string("/etc/machine-id") {
        Ok(id) if !id.trim().is_empty() => id,
        // The UTS namespace's host name.
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default(),
    }
}

/// Raises the soft limit of open files to the hard one. The broker holds a socket per
/// client, plus a few descriptors per network: a thousand clients exceed the usual soft
/// limit of 1024, while the hard limit is what the administrator allows.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through the pointer, which points to `limit`,
    // an rlimit we exclusively borrow for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(
            "cannot read the open file limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let soft = limit.rlim_cur;
    if soft >= limit.rlim_max {
        info!(limit = soft, "open file limit");
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one rlimit through the pointer, which points to `limit`,
    // initialized and borrowed for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        warn!(
            limit = soft,
            "cannot raise the open file limit to {}: {}",
            limit.rlim_max,
            std::io::Error::last_os_error()
        );
        return;
    }
    info!(
        from = soft,
        to = limit.rlim_max,
        "raised the open file limit (a socket per client)"
    );
}

pub fn main(args: Args) -> super::Result {
    // First, before anything opens a file: the fds the service manager passed start at 3.
    let passed = vmnet_broker::systemd::passed_fds().map_err(|e| vmnet_broker::error::chain(&e))?;
    super::init_logging(&args.log_level, args.log_format)?;
    raise_open_file_limit();
    let idle = super::seconds("idle-timeout", args.idle_timeout)?;
    let metrics_interval = super::seconds("metrics-interval", args.metrics_interval)?;
    if metrics_interval.is_zero() {
        return Err("--metrics-interval must be more than 0 seconds".into());
    }
    let exit_on_idle = args
        .exit_on_idle
        .map(|s| super::seconds("exit-on-idle", s))
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let notifier = std::sync::Arc::new(Notifier::from_env());
    runtime.block_on(async move {
        let state_dir = args.state_dir.clone();
        let backend = LinuxBackend::new(LinuxOptions {
            state_dir: args.state_dir,
            resolv_conf: args.resolv_conf,
            tap_pool: usize::from(args.tap_pool),
        })
        .await?;
        info!(config_dir = %args.config_dir.display(), idle_timeout = idle.as_secs_f64(), "starting");
        let config_dir = ConfigDir::new(args.config_dir);
        let registry = Registry::new(
            backend,
            config_dir.clone(),
            Box::new(SystemDirectory),
            idle,
        );
        registry.set_host_id(vmnet_broker::registry::host_id(&host_identity(args.host_id)));
        // What a previous broker recorded is adopted as it is; a state file that cannot
        // be used is no reason not to start: everything of the previous broker is then
        // removed, as after a crash before this file existed.
        let dir = state_dir.clone();
        let recorded = match tokio::task::spawn_blocking(move || state::load(&dir)).await? {
            Ok(Some(recorded)) => recorded,
            Ok(None) => state::BrokerState::default(),
            Err(e) => {
                warn!(
                    "ignoring the state file, removing what the previous broker left instead: {}",
                    vmnet_broker::error::chain(&e)
                );
                state::BrokerState::default()
            }
        };
        // Clients the service manager handed back (fd store) whose record is there are
        // restored; a connection without a record cannot be served and is closed.
        let mut clients = vec![];
        let mut connections = vec![];
        for (id, fd) in passed.clients {
            match recorded.clients.iter().find(|c| c.id == id) {
                Some(record) => {
                    clients.push(record.clone());
                    connections.push((id, fd));
                }
                None => {
                    warn!(client = id, "connection handed back without a record of its client: closing it");
                    notifier.forget_client(id);
                }
            }
        }
        let adopted = registry.adopt(recorded.networks, clients).await;
        if !adopted.is_empty() {
            info!(networks = ?adopted, "adopted the previous broker's networks");
            let counters = vmnet_broker::metrics::counters();
            counters.restarts_with_adoption.inc();
            counters.adopted_networks.inc_by(adopted.len() as u64);
        }
        // Leftovers of a crashed broker only get in the way of the networks they
        // belonged to (and those are reported when created): not a reason not to serve.
        if let Err(e) = registry.backend().remove_stale().await {
            warn!(
                "cannot remove what a previous broker left behind: {}",
                vmnet_broker::error::chain(&e)
            );
        }
        registry.persist(state_dir);
        // Ends with the runtime, when serving is over.
        if let Some(path) = args.metrics_file {
            tokio::spawn(vmnet_broker::server::write_metrics_file(
                std::sync::Arc::clone(&registry),
                path,
                metrics_interval,
            ));
        }
        // On a worker, not on this thread (`block_on`'s): the accept loop is woken by the
        // worker that polls the kernel's events, which would otherwise wake this thread
        // for every connection, a hop more for each client on a 2-CPU machine.
        tokio::spawn(serve(
            std::sync::Arc::clone(&registry),
            ServerOptions {
                socket: args.socket,
                activated: passed.listener,
                restored: connections,
                exit_on_idle,
                config_dir: Some(config_dir),
                notifier,
            },
        ))
        .await?
        .map_err(|e| vmnet_broker::error::chain(&e))?;
        // The last change (every network removed) is on disk before the process ends.
        registry.flush_state().await;
        Ok::<_, Box<dyn std::error::Error>>(ExitCode::SUCCESS)
    })
}
