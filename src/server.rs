//! The daemon's socket side: accepts clients on the SOCK_SEQPACKET socket, reads their
//! credentials, turns messages into registry calls and sends TAP fds back.
//!
//! One task per connection; a connection's end (close, crash, SIGKILL of the client) is
//! its release. Bad requests get an error reply and the connection stays up, so a client
//! that already holds networks never loses them through a mistake.
//!
//! The registry's answers become wire messages in [`crate::answers`], which the macOS XPC
//! server shares; they are re-exported here under their old paths.

pub use crate::answers::{network_info, status_reply, wire_error};
use crate::backend::Backend;
use crate::config::ConfigDir;
use crate::inspect;
use crate::metrics;
use crate::policy::Peer;
use crate::protocol::{BrokerError, ForwardInfo, MAX_MESSAGE, Mac, Reply, Request};
use crate::registry::{ClientId, Registry, RegistryError};
use crate::reload::{Change, ConfigView, Definition, changes};
use crate::systemd::{Activated, Notifier, status_line};
use nix::sys::socket::MsgFlags;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_seqpacket::ancillary::AncillaryMessageWriter;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tracing::{debug, error, info, warn};

/// The group whose members may connect, when it exists (docs/security.md).
pub const SOCKET_GROUP: &str = "vmnet-broker";

pub struct ServerOptions {
    /// Where to listen; with `activated`, only its name in logs.
    pub socket: PathBuf,
    /// A listener the service manager passed (socket activation): served instead of
    /// binding `socket`, and left in place on exit (the manager owns it).
    pub activated: Option<Activated>,
    /// Client connections the service manager handed back (its fd store), by the client
    /// id the registry restored them under ([`Registry::adopt`]).
    pub restored: Vec<(ClientId, std::os::fd::OwnedFd)>,
    /// Exit after no client has been connected for this long (socket activation).
    pub exit_on_idle: Option<Duration>,
    /// The config directory SIGHUP re-reads to report changes; `None`: SIGHUP only logs.
    pub config_dir: Option<ConfigDir>,
    /// Service manager notifications (READY, STATUS, WATCHDOG, RELOADING, STOPPING).
    pub notifier: Arc<Notifier>,
}

/// The reply to `list`, `show` or `leases`: what the registry shows `peer` (only the
/// networks it may use), cut to fit one message.
async fn inspect_reply<B: Backend>(
    registry: &Arc<Registry<B>>,
    peer: &Peer,
    request: Request,
) -> Reply {
    let result =
        match request {
            Request::List => registry
                .networks(peer, None)
                .await
                .map(|v| Reply::List(inspect::list_reply(v).fit(MAX_MESSAGE))),
            Request::Show { network_name } => registry
                .networks(peer, Some(&network_name))
                .await
                .map(|v| match v.into_iter().next() {
                    Some(view) => Reply::Show(inspect::show_reply(view).fit(MAX_MESSAGE)),
                    None => Reply::Error(wire_error(&RegistryError::NotFound(network_name))),
                }),
            Request::Leases { network_name } => registry
                .leases(peer, network_name.as_deref())
                .await
                .map(|l| {
                    let list = inspect::leases_reply(l, std::time::SystemTime::now());
                    Reply::Leases(list.fit(MAX_MESSAGE))
                }),
            Request::Acquire { .. } | Request::Status | Request::Forward(_) | Request::Metrics => {
                unreachable!("only list, show and leases come here")
            }
        };
    result.unwrap_or_else(|e| Reply::Error(wire_error(&e)))
}

/// The broker's metrics now: the process's counters and what the registry holds, as
/// OpenMetrics text (`metrics` request, `serve --metrics-file`).
pub async fn metrics_text<B: Backend>(registry: &Registry<B>) -> String {
    // Every network: the scrape is the operator's view, as `status` is.
    let root = Peer {
        pid: 0,
        uid: 0,
        gid: 0,
        groups: None,
    };
    let mut leases = std::collections::BTreeMap::<String, u64>::new();
    match registry.leases(&root, None).await {
        Ok(list) => {
            for l in list {
                *leases.entry(l.network).or_default() += 1;
            }
        }
        Err(e) => warn!("metrics: cannot list leases: {}", crate::error::chain(&e)),
    }
    let views = registry.networks(&root, None).await.unwrap_or_else(|e| {
        warn!("metrics: cannot list networks: {}", crate::error::chain(&e));
        vec![]
    });
    let networks = views
        .into_iter()
        .filter_map(|v| {
            // Only networks that exist; a defined one has nothing to count.
            let details = v.details?;
            let pool_size = if v.config.dhcp {
                crate::dhcp::pool_size(
                    details.subnet,
                    details.gateway,
                    v.config.dhcp_range.as_ref(),
                    &v.config.dhcp_reservations,
                ) as u64
            } else {
                0
            };
            Some(metrics::NetworkGauges {
                leases: leases.get(&v.name).copied().unwrap_or(0),
                clients: v.clients as u64,
                taps: v.taps.len() as u64,
                pool_size,
                // Static (the network's file) and dynamic (clients' `forward` requests).
                forwards: (v.config.port_forwarding_rules.len() + v.forwards.len()) as u64,
                name: v.name,
            })
        })
        .collect();
    let clients = registry.status().await.clients.len() as u64;
    metrics::render(
        metrics::counters(),
        &metrics::Snapshot { networks, clients },
    )
}

/// Rewrites `path` with the metrics every `period`, atomically (a temporary file renamed
/// over it), for node-exporter's textfile collector. Runs until the server stops.
pub async fn write_metrics_file<B: Backend>(
    registry: Arc<Registry<B>>,
    path: PathBuf,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        let text = metrics_text(&registry).await;
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&target, &text)).await;
        match written {
            Ok(Ok(())) => warned = false,
            // Once per run of failures: a full disk would otherwise log every few seconds.
            Ok(Err(e)) if !warned => {
                warned = true;
                warn!("cannot write the metrics file {}: {e}", path.display());
            }
            _ => {}
        }
    }
}

/// Writes `text` to a temporary file next to `path`, then renames it over `path`: a
/// reader sees the old or the new file, never half of one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    // Readable by the node exporter whatever the broker's umask.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create socket directory {}", .0.display())]
    SocketDir(PathBuf, #[source] std::io::Error),
    #[error("another broker is already serving at {}; stop it first", .0.display())]
    AlreadyServing(PathBuf),
    #[error("cannot remove stale socket {}", .0.display())]
    StaleSocket(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on {}", .0.display())]
    Listen(PathBuf, #[source] std::io::Error),
    #[error("cannot set the mode of {}", .0.display())]
    Mode(PathBuf, #[source] std::io::Error),
    #[error("cannot give {} to group {SOCKET_GROUP}", .0.display())]
    Group(PathBuf, #[source] nix::Error),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot serve the socket passed by the service manager")]
    Activated(#[source] std::io::Error),
}

/// Counts live connections so the idle-exit timer needs no lock on the registry.
struct Connections {
    live: AtomicUsize,
    changed: Notify,
}

/// Serves until a signal arrives while no client is connected, or the idle exit fires.
/// Every network is removed before it returns.
///
/// This server passes endpoints as fds (SCM_RIGHTS), so it serves backends whose
/// endpoint is one.
pub async fn serve<B: Backend<Endpoint: AsFd>>(
    registry: Arc<Registry<B>>,
    options: ServerOptions,
) -> Result<(), ServeError> {
    // Before the socket appears: whoever sees it may send SIGTERM at once, and without a
    // handler that would kill the broker instead of asking it to stop.
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    // SIGHUP reloads; without a handler it would end the broker (the default action).
    let mut sighup = signal(SignalKind::hangup()).map_err(ServeError::Signals)?;
    let ServerOptions {
        socket,
        activated,
        restored,
        exit_on_idle,
        config_dir,
        notifier,
    } = options;
    // Only a socket this process bound is removed on exit: an activated one belongs to
    // the service manager, which keeps listening on it while the broker is not running.
    let (mut listener, owned_path) = match activated {
        Some(a) => {
            let listener = UnixSeqpacketListener::try_from(a.fd).map_err(ServeError::Activated)?;
            info!(socket = %a.path.display(), "serving the socket passed by the service manager");
            (listener, None)
        }
        None => (bind(&socket)?, Some(socket.clone())),
    };
    info!(
        socket = %socket.display(),
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "broker serving"
    );
    let conns = Arc::new(Connections {
        live: AtomicUsize::new(0),
        changed: Notify::new(),
    });
    // The baseline SIGHUP compares with: the directory as it was at start.
    let mut config_view = match &config_dir {
        Some(dir) => Some(read_config(dir.clone()).await),
        None => None,
    };
    notifier.ready(&current_status(&registry).await);
    let mut tasks = Vec::new();
    if notifier.enabled() {
        tasks.push(tokio::spawn(report_status(
            Arc::clone(&registry),
            Arc::clone(&conns),
            Arc::clone(&notifier),
        )));
        if let Some(interval) = notifier.watchdog_interval() {
            info!(
                interval_ms = interval.as_millis() as u64,
                "service manager watchdog enabled"
            );
            tasks.push(tokio::spawn(watchdog(
                Arc::clone(&registry),
                Arc::clone(&notifier),
                interval,
            )));
        }
    }
    for (client, fd) in restored {
        let socket = match set_nonblocking(&fd).and_then(|()| UnixSeqpacket::try_from(fd)) {
            Ok(socket) => socket,
            Err(e) => {
                warn!(client, "cannot serve the connection handed back: {e}");
                registry.disconnect(client).await;
                notifier.forget_client(client);
                continue;
            }
        };
        info!(
            client,
            "serving a connection handed back by the service manager"
        );
        conns.live.fetch_add(1, Ordering::SeqCst);
        let (registry, conns, notifier) = (
            Arc::clone(&registry),
            Arc::clone(&conns),
            Arc::clone(&notifier),
        );
        tokio::spawn(async move {
            handle_connection(registry, socket, notifier, Some(client)).await;
            conns.live.fetch_sub(1, Ordering::SeqCst);
            conns.changed.notify_waiters();
        });
    }
    let result = loop {
        let idle = idle_exit(&conns, exit_on_idle);
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(socket) => {
                    conns.live.fetch_add(1, Ordering::SeqCst);
                    conns.changed.notify_waiters();
                    let (registry, conns, notifier) = (
                        Arc::clone(&registry),
                        Arc::clone(&conns),
                        Arc::clone(&notifier),
                    );
                    tokio::spawn(async move {
                        handle_connection(registry, socket, notifier, None).await;
                        conns.live.fetch_sub(1, Ordering::SeqCst);
                        conns.changed.notify_waiters();
                    });
                }
                // EMFILE and friends: keep serving the clients we have.
                Err(e) => {
                    error!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = sigterm.recv() => if stop_requested(&registry, &notifier, "SIGTERM").await { break Ok(()) },
            _ = sigint.recv() => if stop_requested(&registry, &notifier, "SIGINT").await { break Ok(()) },
            _ = sighup.recv() => {
                notifier.reloading();
                reload(&registry, config_dir.as_ref(), &mut config_view).await;
                notifier.ready(&current_status(&registry).await);
            }
            _ = idle => {
                if registry.shutdown_if_idle().await {
                    info!("no client for the idle-exit period: exiting");
                    break Ok(());
                }
            }
        }
    };
    notifier.stopping();
    for task in tasks {
        task.abort();
    }
    drop(listener);
    if let Some(path) = owned_path
        && let Err(e) = std::fs::remove_file(&path)
    {
        warn!("cannot remove socket {}: {e}", path.display());
    }
    info!("broker stopped");
    result
}

/// How often STATUS= is refreshed at most, and at least while something may change
/// unseen (a network removed after its idle timeout changes no connection).
const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);
const STATUS_MAX_INTERVAL: Duration = Duration::from_secs(10);

async fn current_status<B: Backend>(registry: &Registry<B>) -> String {
    let s = registry.status().await;
    status_line(s.networks.len(), s.clients.len())
}

/// Keeps the service manager's STATUS= line current: refreshed when a client connects or
/// leaves, and every [`STATUS_MAX_INTERVAL`], sent only when it changed and at most once
/// per [`STATUS_MIN_INTERVAL`] (a thousand clients connecting send a few lines, not a
/// thousand).
async fn report_status<B: Backend>(
    registry: Arc<Registry<B>>,
    conns: Arc<Connections>,
    notifier: Arc<Notifier>,
) {
    let mut last = String::new();
    loop {
        let _ = tokio::time::timeout(STATUS_MAX_INTERVAL, conns.changed.notified()).await;
        tokio::time::sleep(STATUS_MIN_INTERVAL).await;
        let line = current_status(&registry).await;
        if line != last {
            notifier.status(&line);
            last = line;
        }
    }
}

/// Sends WATCHDOG=1 every `interval` while the registry answers a status query within
/// that interval: a broker whose registry is stuck (a lock held forever, a blocked
/// runtime) stops sending, and the service manager restarts it after `WatchdogSec=`.
async fn watchdog<B: Backend>(
    registry: Arc<Registry<B>>,
    notifier: Arc<Notifier>,
    interval: Duration,
) {
    loop {
        match tokio::time::timeout(interval, registry.status()).await {
            Ok(_) => notifier.watchdog(),
            Err(_) => warn!(
                "watchdog: the registry did not answer within {} ms; not telling the service manager we are alive",
                interval.as_millis()
            ),
        }
        tokio::time::sleep(interval).await;
    }
}

async fn read_config(dir: ConfigDir) -> ConfigView {
    tokio::task::spawn_blocking(move || ConfigView::read(&dir))
        .await
        .unwrap_or_default()
}

/// SIGHUP: re-reads the config directory and logs what changed since the last read. It
/// changes almost nothing that runs: the registry reads a network's definition when it
/// creates the network, so an active network keeps its config until it is removed and
/// recreated. The exception is the peers of a network that spans hosts, when they are
/// all that changed: a host joins or leaves without the VMs of the others noticing.
/// resolv.conf needs no reload (the DNS forwarders re-read it when it changes) and the
/// firewall is re-checked by its own watchdog every few seconds.
async fn reload<B: Backend>(
    registry: &Registry<B>,
    config_dir: Option<&ConfigDir>,
    view: &mut Option<ConfigView>,
) {
    info!("SIGHUP: reloading");
    if let (Some(dir), Some(old)) = (config_dir, view.as_mut()) {
        let new = read_config(dir.clone()).await;
        let found = changes(old, &new);
        let active: std::collections::BTreeSet<String> = registry
            .status()
            .await
            .networks
            .into_iter()
            .map(|n| n.name)
            .collect();
        if found.is_empty() {
            info!(config_dir = %dir.path.display(), "config: no change");
        }
        for change in &found {
            let network = change.network();
            let when = if active.contains(network) {
                "active: keeps its current config until it is removed"
            } else {
                "takes effect when the network is next created"
            };
            if let (Change::Changed(_), true, Some(Definition::Valid(config))) =
                (change, active.contains(network), new.0.get(network))
            {
                match registry.set_overlay_peers(network, config).await {
                    Ok(true) => {
                        info!(
                            network,
                            "config: overlay peers changed, applied to the active network"
                        );
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => warn!(
                        network,
                        "config: cannot apply the new overlay peers: {}",
                        crate::error::chain(&e)
                    ),
                }
            }
            match change {
                Change::Added(_) => info!(network, "config: new network ({when})"),
                Change::Removed(_) => info!(network, "config: definition removed ({when})"),
                Change::Changed(_) => info!(network, "config: definition changed ({when})"),
                Change::Fixed(_) => info!(network, "config: definition valid again ({when})"),
                Change::Invalid(_, why) => warn!(network, "config: invalid: {why}"),
            }
        }
        *view = Some(new);
    }
    info!(
        "resolv.conf: re-read by the DNS forwarders whenever it changes; firewall: checked and restored by its watchdog every few seconds"
    );
    info!("reload done");
}

/// Waits until no connection has been open for `period`; never resolves without one.
async fn idle_exit(conns: &Connections, period: Option<Duration>) {
    let Some(period) = period else {
        return std::future::pending().await;
    };
    loop {
        let changed = conns.changed.notified();
        if conns.live.load(Ordering::SeqCst) == 0 {
            if tokio::time::timeout(period, changed).await.is_err() {
                return;
            }
        } else {
            changed.await;
        }
    }
}

async fn stop_requested<B: Backend>(
    registry: &Registry<B>,
    notifier: &Notifier,
    signal: &str,
) -> bool {
    if registry.shutdown_if_idle().await {
        info!("{signal}: no clients, networks removed, exiting");
        true
    } else if notifier.can_hand_over() {
        // Every client's connection is in the manager's fd store and every network in
        // the state file: the next broker takes both over, so nothing is removed.
        let n = registry.holders().await;
        info!(
            "{signal}: {n} client(s) hold networks; handing over to the next broker \
             (connections in the service manager's fd store, networks left in place), exiting"
        );
        true
    } else {
        let n = registry.holders().await;
        warn!(
            "{signal} ignored: {n} client(s) hold networks; stopping would pull networks from under running VMs"
        );
        false
    }
}

fn bind(path: &Path) -> Result<UnixSeqpacketListener, ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| ServeError::SocketDir(dir.to_path_buf(), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| ServeError::Mode(dir.to_path_buf(), e))?;
    }
    if path.exists() {
        // A live broker answers a connect; a stale socket from a crash refuses it.
        if UnixSeqpacket::connect_blocking(path).is_ok() {
            return Err(ServeError::AlreadyServing(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| ServeError::StaleSocket(path.to_path_buf(), e))?;
    }
    // Created owner-only and opened up to the group below: with a lax umask it would
    // otherwise be world-connectable for a moment, and such a connection would last.
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixSeqpacketListener::bind_with_backlog(path, 1024);
    nix::sys::stat::umask(umask);
    let listener = bound.map_err(|e| ServeError::Listen(path.to_path_buf(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| ServeError::Mode(path.to_path_buf(), e))?;
    match nix::unistd::Group::from_name(SOCKET_GROUP) {
        Ok(Some(group)) => {
            nix::unistd::chown(path, None, Some(group.gid))
                .map_err(|e| ServeError::Group(path.to_path_buf(), e))?;
            info!("socket mode 0660, group {SOCKET_GROUP}");
        }
        _ => info!(
            "socket mode 0660; group {SOCKET_GROUP} does not exist, so only root can connect (docs/security.md)"
        ),
    }
    Ok(listener)
}

/// tokio needs a non-blocking fd; the service manager passes them as they were stored.
fn set_nonblocking(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Serves one connection until it closes, then releases what its client held.
/// `restored`: the client id of a connection handed back by the service manager, whose
/// client the registry already knows (the previous broker's).
async fn handle_connection<B: Backend<Endpoint: AsFd>>(
    registry: Arc<Registry<B>>,
    socket: UnixSeqpacket,
    notifier: Arc<Notifier>,
    restored: Option<ClientId>,
) {
    let (client, peer) = match restored {
        Some(client) => match registry.peer_of(client) {
            Some(peer) => (client, peer),
            None => return,
        },
        None => match connect(&registry, &socket).await {
            Some(c) => {
                // A copy in the manager's fd store: the next broker gets it back.
                notifier.store_client(c.0, socket.as_fd());
                c
            }
            None => return,
        },
    };
    serve_client(&registry, &socket, client, &peer).await;
    registry.disconnect(client).await;
    notifier.forget_client(client);
}

/// Reads the peer's credentials and registers it; on refusal answers and closes.
async fn connect<B: Backend<Endpoint: AsFd>>(
    registry: &Arc<Registry<B>>,
    socket: &UnixSeqpacket,
) -> Option<(ClientId, Peer)> {
    let peer = match socket.peer_cred() {
        Ok(c) => Peer {
            pid: c.pid().unwrap_or(0),
            uid: c.uid(),
            gid: c.gid(),
            groups: peer_groups(socket).map(Into::into),
        },
        Err(e) => {
            warn!("cannot read peer credentials, closing: {e}");
            return None;
        }
    };
    match registry.connect(peer.clone()).await {
        Ok(id) => Some((id, peer)),
        Err(e) => {
            let _ = socket.send(&Reply::Error(wire_error(&e)).to_bytes()).await;
            drain_before_close(socket).await;
            None
        }
    }
}

/// Answers the client's requests until its connection closes.
async fn serve_client<B: Backend<Endpoint: AsFd>>(
    registry: &Arc<Registry<B>>,
    socket: &UnixSeqpacket,
    client: ClientId,
    peer: &Peer,
) {
    loop {
        // A buffer the size of the message, made when it arrives: a 64 KiB one kept per
        // connection cost ~64 KiB of RSS each (calloc zeroes all of it in a thread's
        // arena), 60 MiB for a thousand idle leases. One byte more than allowed, so an
        // oversized message is seen as such.
        let len = match next_message_len(socket).await {
            Ok(len) => len,
            Err(e) => {
                debug!(client, "receive failed: {e}");
                break;
            }
        };
        let mut buf = vec![0u8; len.clamp(1, MAX_MESSAGE + 1)];
        let info = match socket.recv(&mut buf).await {
            Ok(info) => info,
            Err(e) => {
                debug!(client, "receive failed: {e}");
                break;
            }
        };
        let n = info.bytes_read();
        // SEQPACKET has no zero-length messages in our protocol: 0 bytes is end of stream.
        if n == 0 {
            break;
        }
        let request = if info.truncated() || n > MAX_MESSAGE {
            Err(BrokerError::invalid(format!(
                "message is larger than {MAX_MESSAGE} bytes"
            )))
        } else {
            Request::parse(&buf[..n])
        };
        // Boxed: a connection waits for its next request almost all of its life, and
        // its task's future is as large as its largest state; with the reply's state
        // inline every idle connection would carry it (ten thousand clients).
        if let Err(e) = Box::pin(respond(registry, socket, client, peer, request)).await {
            debug!(client, "send failed, closing: {e}");
            break;
        }
    }
}

/// Supplementary groups of the process that connected (`SO_PEERGROUPS`, Linux 4.13), as
/// the kernel recorded them at connect; `None` if the kernel cannot tell.
#[cfg(target_os = "linux")]
fn peer_groups(socket: &UnixSeqpacket) -> Option<Vec<u32>> {
    // NGROUPS_MAX on Linux: no process has more.
    const MAX_GROUPS: usize = 65536;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of exactly `len` bytes that the kernel writes
        // gid_t values into; `len` is a valid socklen_t the kernel updates.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Some(groups);
        }
        // ERANGE: the buffer was too small and `len` says how big it must be.
        let errno = std::io::Error::last_os_error().raw_os_error();
        if errno == Some(libc::ERANGE) && count > groups.len() && count <= MAX_GROUPS {
            groups.resize(count, 0);
            continue;
        }
        debug!("SO_PEERGROUPS unavailable ({errno:?}): group checks use the user database");
        return None;
    }
}

#[cfg(not(target_os = "linux"))]
fn peer_groups(_socket: &UnixSeqpacket) -> Option<Vec<u32>> {
    None
}

/// Before a refused connection is closed: reads (and drops) what the client sent until it
/// closes, for at most two seconds. A unix socket closed with unread messages makes
/// the peer's next receive fail with ECONNRESET *instead of* returning the queued reply,
/// so a client that sent its request right after connecting would never see why it was
/// refused.
async fn drain_before_close(socket: &UnixSeqpacket) {
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        // One byte is enough: SEQPACKET drops the rest of a longer message.
        let mut byte = [0u8; 1];
        while let Ok(info) = socket.recv(&mut byte).await {
            if info.bytes_read() == 0 && !info.truncated() {
                break;
            }
        }
    })
    .await;
}

/// Waits for the next message and returns its whole length without reading it
/// (`MSG_PEEK | MSG_TRUNC`, which AF_UNIX answers with the datagram's full size); 0 at the
/// end of the stream.
async fn next_message_len(socket: &UnixSeqpacket) -> std::io::Result<usize> {
    loop {
        let mut ready = socket.as_async_fd().readable().await?;
        let peeked = ready.try_io(|_| {
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT;
            nix::sys::socket::recv(socket.as_raw_fd(), &mut [0u8; 1], flags)
                .map_err(std::io::Error::from)
        });
        if let Ok(result) = peeked {
            return result;
        }
    }
}

async fn respond<B: Backend<Endpoint: AsFd>>(
    registry: &Arc<Registry<B>>,
    socket: &UnixSeqpacket,
    client: ClientId,
    peer: &Peer,
    request: Result<Request, BrokerError>,
) -> std::io::Result<()> {
    let what = match &request {
        Ok(Request::Acquire { .. }) => "acquire",
        Ok(Request::Status) => "status",
        Ok(Request::List) => "list",
        Ok(Request::Show { .. }) => "show",
        Ok(Request::Leases { .. }) => "leases",
        Ok(Request::Metrics) => "metrics",
        Ok(Request::Forward(_)) => "forward",
        Err(_) => "invalid",
    };
    let reply = match request {
        Err(e) => {
            warn!(
                client,
                client_pid = peer.pid,
                client_uid = peer.uid,
                error_code = e.code.code(),
                "bad request: {}",
                e.message
            );
            Reply::Error(e)
        }
        Ok(Request::Metrics) => Reply::Metrics(metrics_text(registry).await),
        Ok(Request::Status) => {
            Reply::Status(status_reply(registry.status_excluding(client).await).fit(MAX_MESSAGE))
        }
        Ok(request @ (Request::List | Request::Show { .. } | Request::Leases { .. })) => {
            inspect_reply(registry, peer, request).await
        }
        Ok(Request::Forward(spec)) => match registry.forward(client, &spec).await {
            Ok(address) => Reply::Forward({
                // On disk before the client hears of it, as for an acquire: a next
                // broker makes the forward again for this connection.
                registry.flush_state().await;
                metrics::counters()
                    .forwards
                    .get_or_create(&metrics::network(&spec.network_name))
                    .inc();
                ForwardInfo {
                    spec,
                    internal_address: address.map(|a| a.to_string()),
                }
            }),
            Err(e) => Reply::Error(wire_error(&e)),
        },
        Ok(Request::Acquire {
            network_name,
            mac,
            persistent,
        }) => {
            let mut steps = crate::steps::Steps::start();
            match registry
                .acquire(client, &network_name, mac.map(Mac::octets), persistent)
                .await
            {
                Ok(mut acquired) => {
                    steps.lap("registry");
                    // What a client is told exists is on disk first: a broker killed
                    // right after this reply still adopts the TAP (and the network, if
                    // this acquire created it) instead of removing it as unknown. One
                    // state write covers every acquire published meanwhile.
                    registry.flush_state().await;
                    acquired.attachment.answering.release();
                    steps.lap("state");
                    metrics::counters()
                        .acquires
                        .get_or_create(&metrics::network(&network_name))
                        .inc();
                    let bytes = Reply::Network(network_info(&acquired)).to_bytes();
                    let mut space = [0u8; 64];
                    let fds = [acquired.attachment.endpoint.as_fd()];
                    let mut ancillary = AncillaryMessageWriter::new(&mut space);
                    ancillary
                        .add_fds(&fds)
                        .map_err(|_| std::io::Error::other("ancillary buffer too small"))?;
                    socket
                        .send_vectored_with_ancillary(&[IoSlice::new(&bytes)], &mut ancillary)
                        .await?;
                    steps.lap("reply");
                    crate::log_steps!("acquire request", network_name, steps);
                    // The endpoint drops here: the client now holds the only copy.
                    return Ok(());
                }
                // The registry logged why, with the network and the client.
                Err(e) => Reply::Error(wire_error(&e)),
            }
        }
    };
    if let Reply::Error(e) = &reply {
        metrics::counters()
            .errors
            .get_or_create(&vec![
                ("code", e.code.code().to_string()),
                ("request", what.to_string()),
            ])
            .inc();
    }
    socket.send(&reply.to_bytes()).await.map(drop)
}
