//! The service manager's side channel: a socket-activated listener (`LISTEN_FDS`) and
//! state notifications (`NOTIFY_SOCKET`: READY, RELOADING, STOPPING, STATUS, WATCHDOG).
//!
//! Built on the `sd-notify` crate (MIT OR Apache-2.0, depends on libc only): it speaks
//! the documented datagram protocol without linking libsystemd, so the broker runs the
//! same with or without systemd. Every notification is a no-op when `NOTIFY_SOCKET` is
//! not set, which is how the broker runs outside a `Type=notify` unit.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::{debug, warn};

/// The name a `.socket` unit gives its fd by default (`FileDescriptorName=`): its own
/// unit name. Used to pick the listener when several fds are passed.
pub const SOCKET_FD_NAME: &str = "vmnet-broker.socket";

/// Why an inherited fd cannot be the broker's listener.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("invalid socket activation environment (LISTEN_FDS, LISTEN_FDNAMES)")]
    Environment(#[source] std::io::Error),
    #[error(
        "{count} file descriptors passed (LISTEN_FDS) and none is named {SOCKET_FD_NAME}: \
         cannot tell which is the broker's socket"
    )]
    Ambiguous { count: usize },
    #[error("passed fd {fd} ({name}): cannot read socket option {option}")]
    Inspect {
        fd: i32,
        name: String,
        option: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error(
        "passed fd {fd} ({name}) is not a listening AF_UNIX SOCK_SEQPACKET socket ({what}); \
         the socket unit needs ListenSequentialPacket= (systemd-socket-activate: --seqpacket)"
    )]
    WrongSocket { fd: i32, name: String, what: String },
}

/// A listening socket handed over by the service manager, checked to be what the broker
/// serves on. The broker does not own its path: it neither unlinks nor chmods it.
pub struct Activated {
    pub fd: OwnedFd,
    /// The path it listens on, for logs (empty when the kernel does not tell).
    pub path: PathBuf,
}

/// The prefix of the fd store name of a client's connection: `client-<id>`.
pub const CLIENT_FD_PREFIX: &str = "client-";

/// What the service manager passed: the listener, and the client connections a previous
/// broker kept in its fd store (`FDSTORE=1`), by client id.
pub struct Passed {
    pub listener: Option<Activated>,
    pub clients: Vec<(u64, OwnedFd)>,
}

/// The fds passed by the service manager: the listener, if any, and the client
/// connections named `client-<id>`. `LISTEN_PID` must name this process
/// (sd_listen_fds(3)), so fds meant for another process are left alone. Must run before
/// any other code opens files, as fds 3.. are taken over.
pub fn passed_fds() -> Result<Passed, ActivationError> {
    let mut fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names()
        .map_err(ActivationError::Environment)?
        .collect();
    let mut clients = vec![];
    fds.retain(|(fd, name)| {
        let Some(id) = name
            .strip_prefix(CLIENT_FD_PREFIX)
            .and_then(|id| id.parse::<u64>().ok())
        else {
            return true;
        };
        // SAFETY: fd is one of those the service manager passed to this process
        // (LISTEN_PID matched), which nothing else in the process owns or closes.
        clients.push((id, unsafe { OwnedFd::from_raw_fd(*fd) }));
        false
    });
    Ok(Passed {
        listener: listener_of(fds)?,
        clients,
    })
}

/// The listener passed by socket activation, if any (see [`passed_fds`], which also
/// takes client connections back).
pub fn activated_listener() -> Result<Option<Activated>, ActivationError> {
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names()
        .map_err(ActivationError::Environment)?
        .collect();
    listener_of(fds)
}

fn listener_of(fds: Vec<(i32, String)>) -> Result<Option<Activated>, ActivationError> {
    let count = fds.len();
    let (fd, name) = match count {
        0 => return Ok(None),
        1 => fds.into_iter().next().expect("one fd"),
        _ => fds
            .into_iter()
            .find(|(_, name)| name == SOCKET_FD_NAME)
            .ok_or(ActivationError::Ambiguous { count })?,
    };
    // SAFETY: fd is one of those the service manager passed to this process (LISTEN_PID
    // matched), which nothing else in the process owns or closes; we take it over.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    let path = check_listener(fd.as_raw_fd(), &name)?;
    // tokio needs a non-blocking fd; systemd passes a blocking one.
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|source| ActivationError::Inspect {
        fd: raw,
        name: name.clone(),
        option: "O_NONBLOCK",
        source,
    })?;
    Ok(Some(Activated { fd, path }))
}

/// Checks that `fd` is a listening AF_UNIX SOCK_SEQPACKET socket (SO_TYPE,
/// SO_ACCEPTCONN, getsockname) and returns its path: a stream socket would accept
/// connections that then speak a different framing, a non-listening one never accepts.
fn check_listener(raw: i32, name: &str) -> Result<PathBuf, ActivationError> {
    use nix::sys::socket::{SockType, getsockname, getsockopt, sockopt};
    // SAFETY: raw is the fd owned by the caller's OwnedFd, open for this whole call.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    let inspect = |option: &'static str| {
        let name = name.to_string();
        move |source| ActivationError::Inspect {
            fd: raw,
            name,
            option,
            source,
        }
    };
    let wrong = |what: String| ActivationError::WrongSocket {
        fd: raw,
        name: name.to_string(),
        what,
    };
    // ENOTSOCK lands here for a regular file or pipe.
    let ty = getsockopt(&fd, sockopt::SockType).map_err(inspect("SO_TYPE"))?;
    if ty != SockType::SeqPacket {
        return Err(wrong(format!("type {ty:?}")));
    }
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(inspect("SO_ACCEPTCONN"))? {
        return Err(wrong("not listening".into()));
    }
    let addr: nix::sys::socket::UnixAddr = getsockname(raw).map_err(|e| match e {
        // getsockname into a UnixAddr refuses other families.
        nix::Error::EINVAL => wrong("not AF_UNIX".into()),
        e => inspect("getsockname")(e),
    })?;
    Ok(addr.path().map(PathBuf::from).unwrap_or_default())
}

/// Sends state notifications to the service manager; does nothing without
/// `NOTIFY_SOCKET`. A failed send is logged once at warn level, then at debug: systemd
/// going away must not flood the log nor stop the broker.
pub struct Notifier {
    enabled: bool,
    /// The manager keeps fds for us (`FDSTORE=` in the environment, set by systemd
    /// 254+ when `FileDescriptorStoreMax=` is above 0; the unit sets it for older ones).
    fd_store: bool,
    warned: AtomicBool,
}

impl Notifier {
    /// From the environment (`NOTIFY_SOCKET`, `FDSTORE`).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let fd_store = std::env::var("FDSTORE")
            .ok()
            .and_then(|n| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
        Notifier {
            enabled,
            fd_store: enabled && fd_store,
            warned: AtomicBool::new(false),
        }
    }

    /// A notifier that never sends (tests, embedding).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            fd_store: false,
            warned: AtomicBool::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether client connections can be left to the next broker: the manager keeps
    /// them in its fd store and passes them back (`LISTEN_FDS`) when it starts the next.
    pub fn can_hand_over(&self) -> bool {
        self.fd_store
    }

    fn report(&self, e: std::io::Error) {
        if self.warned.swap(true, Ordering::Relaxed) {
            debug!("cannot notify the service manager: {e}");
        } else {
            warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
        }
    }

    /// Keeps a copy of client `id`'s connection in the manager's fd store, so that the
    /// next broker gets it back if this one exits (or dies) while it is open.
    pub fn store_client(&self, id: u64, connection: BorrowedFd<'_>) {
        if !self.fd_store {
            return;
        }
        let name = format!("{CLIENT_FD_PREFIX}{id}");
        let states = [
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(&name),
        ];
        if let Err(e) = sd_notify::notify_with_fds(&states, &[connection]) {
            self.report(e);
        }
    }

    /// Drops client `id`'s connection from the manager's fd store (it left).
    pub fn forget_client(&self, id: u64) {
        if !self.fd_store {
            return;
        }
        let name = format!("{CLIENT_FD_PREFIX}{id}");
        self.send(&[
            sd_notify::NotifyState::FdStoreRemove,
            sd_notify::NotifyState::FdName(&name),
        ]);
    }

    fn send(&self, states: &[sd_notify::NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            self.report(e);
        }
    }

    /// The socket serves.
    pub fn ready(&self, status: &str) {
        self.send(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// A reload (SIGHUP) starts; `ready` ends it. MONOTONIC_USEC lets systemd tell this
    /// reload from an earlier one (`Type=notify-reload` requires it, `notify` accepts it).
    pub fn reloading(&self) {
        match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[sd_notify::NotifyState::Reloading, now]),
            Err(_) => self.send(&[sd_notify::NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[sd_notify::NotifyState::Stopping]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[sd_notify::NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[sd_notify::NotifyState::Watchdog]);
    }

    /// How often to send WATCHDOG=1, when the manager asked for it (`WatchdogSec=`, seen
    /// as `WATCHDOG_USEC` for this pid): half the period, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        sd_notify::watchdog_enabled()
            .filter(|d| !d.is_zero())
            .map(|d| d / 2)
    }
}

/// The STATUS= line: what `systemctl status` shows under the unit.
pub fn status_line(networks: usize, clients: usize) -> String {
    format!("{networks} network(s), {clients} client(s)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, listen, socket};

    fn unix_socket(ty: SockType) -> OwnedFd {
        socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).unwrap()
    }

    #[test]
    fn a_listening_seqpacket_socket_is_accepted_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let fd = unix_socket(SockType::SeqPacket);
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&fd, nix::sys::socket::Backlog::new(8).unwrap()).unwrap();
        assert_eq!(check_listener(fd.as_raw_fd(), "x").unwrap(), path);
    }

    #[test]
    fn stream_unbound_and_non_socket_fds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stream = unix_socket(SockType::Stream);
        bind(
            stream.as_raw_fd(),
            &UnixAddr::new(&dir.path().join("t")).unwrap(),
        )
        .unwrap();
        listen(&stream, nix::sys::socket::Backlog::new(8).unwrap()).unwrap();
        let e = check_listener(stream.as_raw_fd(), "x").unwrap_err();
        assert!(matches!(e, ActivationError::WrongSocket { .. }), "{e}");
        assert!(e.to_string().contains("ListenSequentialPacket"), "{e}");

        let idle = unix_socket(SockType::SeqPacket);
        let e = check_listener(idle.as_raw_fd(), "x").unwrap_err();
        assert!(e.to_string().contains("not listening"), "{e}");

        let file = std::fs::File::open("/dev/null").unwrap();
        let e = check_listener(file.as_raw_fd(), "x").unwrap_err();
        assert!(matches!(e, ActivationError::Inspect { .. }), "{e}");
    }

    #[test]
    fn watchdog_interval_is_off_without_notify_socket() {
        assert_eq!(Notifier::disabled().watchdog_interval(), None);
    }
}
