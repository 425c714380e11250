//! Upstream resolvers from a resolv.conf file, re-read when the file changes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Per-server timeout when resolv.conf says nothing. glibc's 5 s is too long for a forwarder:
/// the VM's own resolver retries after about 5 s, so an answer must come well before that.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds over the server list when resolv.conf says nothing: one, the client retries itself.
pub const DEFAULT_ATTEMPTS: u32 = 1;
// Bounds applied to `options timeout:`/`attempts:` so a odd resolv.conf cannot make a query
// task live for minutes (tasks are bounded, so slow ones would starve the rest).
const MAX_TIMEOUT_SECS: u64 = 5;
const MAX_ATTEMPTS: u32 = 3;

/// What the forwarder needs from resolv.conf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub attempts: u32,
}

impl Upstreams {
    /// Parses resolv.conf text. `exclude` is our own listening address: listing it as an
    /// upstream would make every forwarded query loop back to us.
    pub fn parse(text: &str, exclude: Ipv4Addr) -> Upstreams {
        let mut servers = Vec::new();
        let mut timeout = DEFAULT_TIMEOUT;
        let mut attempts = DEFAULT_ATTEMPTS;
        for line in text.lines() {
            // Comments start with '#' or ';' anywhere on the line (resolv.conf(5)).
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(addr) = words.next().and_then(parse_nameserver)
                        && addr.ip() != IpAddr::V4(exclude)
                        && !servers.contains(&addr)
                    {
                        servers.push(addr);
                    }
                }
                Some("options") => {
                    for opt in words {
                        if let Some(v) = opt.strip_prefix("timeout:")
                            && let Ok(secs) = v.parse::<u64>()
                        {
                            timeout = Duration::from_secs(secs.clamp(1, MAX_TIMEOUT_SECS));
                        } else if let Some(v) = opt.strip_prefix("attempts:")
                            && let Ok(n) = v.parse::<u32>()
                        {
                            attempts = n.clamp(1, MAX_ATTEMPTS);
                        }
                    }
                }
                _ => {}
            }
        }
        Upstreams {
            servers,
            timeout,
            attempts,
        }
    }

    /// The list as it would appear in a log line.
    pub fn describe(&self) -> String {
        let list: Vec<String> = self.servers.iter().map(|s| s.to_string()).collect();
        format!(
            "[{}] timeout {}s attempts {}",
            list.join(", "),
            self.timeout.as_secs(),
            self.attempts
        )
    }
}

/// `nameserver` takes an IPv4 or IPv6 address, the latter possibly with `%scope`.
fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    if let Ok(ip) = word.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    let (addr, scope) = word.split_once('%')?;
    let ip: std::net::Ipv6Addr = addr.parse().ok()?;
    let scope_id = match scope.parse::<u32>() {
        Ok(n) => n,
        Err(_) => nix::net::if_::if_nametoindex(scope).ok()?,
    };
    Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope_id)))
}

/// Identity of the file's current version: any rewrite (in place or by rename) changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    len: u64,
    regular: bool,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    // metadata() follows symlinks, so a /etc/resolv.conf symlink re-pointed elsewhere counts too.
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
        len: m.len(),
        regular: m.is_file(),
    })
}

/// How often the watcher looks at resolv.conf: one stat() per period and network, whatever
/// the query rate (resolver managers rewrite the file rarely; a second of delay is harmless).
pub const RESOLV_POLL: Duration = Duration::from_secs(1);

/// resolv.conf followed on change. Owned by one watcher task: the file I/O happens there
/// (on a blocking thread), never on the query path and never under a lock; queries only
/// load the latest snapshot from a `watch` channel.
pub struct ResolvConf {
    path: PathBuf,
    exclude: Ipv4Addr,
    network: String,
    /// Stamp of the version read (None: not read, or gone since).
    stamp: Option<FileStamp>,
    upstreams: Arc<Upstreams>,
    /// A failure to stat was logged (warn once per disappearance, not every period).
    stat_failure_logged: bool,
}

impl ResolvConf {
    /// Nothing read yet: no upstreams until the first `refresh`.
    pub fn new(path: PathBuf, exclude: Ipv4Addr, network: String) -> ResolvConf {
        ResolvConf {
            path,
            exclude,
            network,
            stamp: None,
            upstreams: Arc::new(Upstreams {
                servers: Vec::new(),
                timeout: DEFAULT_TIMEOUT,
                attempts: DEFAULT_ATTEMPTS,
            }),
            stat_failure_logged: false,
        }
    }

    /// `refresh` on a blocking thread (a file on a hung mount must not stall the runtime);
    /// returns self and the current upstreams.
    pub async fn refreshed(mut self) -> (ResolvConf, Arc<Upstreams>) {
        match tokio::task::spawn_blocking(move || {
            self.refresh();
            self
        })
        .await
        {
            Ok(rc) => {
                let ups = rc.upstreams.clone();
                (rc, ups)
            }
            // A panic in refresh is a bug: let it end the task as if it had happened here.
            // (Cancellation cannot happen: blocking tasks are not cancelled.)
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Re-reads the file every [`RESOLV_POLL`] and publishes each new upstream list until
    /// `shutdown`.
    pub async fn follow(
        mut self,
        tx: watch::Sender<Arc<Upstreams>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(RESOLV_POLL) => {}
            }
            let before = self.upstreams.clone();
            let refreshed = tokio::select! {
                _ = shutdown.changed() => return,
                r = self.refreshed() => r,
            };
            let (rc, ups) = refreshed;
            self = rc;
            if !Arc::ptr_eq(&before, &ups) {
                tx.send_replace(ups);
            }
        }
    }

    /// The upstreams last read.
    #[cfg(test)]
    pub fn current(&self) -> Arc<Upstreams> {
        self.upstreams.clone()
    }

    /// Re-reads the file if it changed since the last call (one stat() when it did not).
    pub fn refresh(&mut self) {
        match stamp(&self.path) {
            Ok(s) if self.stamp == Some(s) => {}
            Ok(s) if !s.regular => {
                // A FIFO would block the reader until someone opens it for writing.
                if self.stamp.is_some() || !self.stat_failure_logged {
                    tracing::warn!(network = %self.network, path = %self.path.display(),
                        "resolv.conf is not a regular file, keeping the previous upstreams");
                }
                self.stamp = None;
                self.stat_failure_logged = true;
            }
            Ok(s) => match read_bounded(&self.path) {
                Ok(text) => {
                    let ups = Upstreams::parse(&text, self.exclude);
                    if ups.servers.is_empty() {
                        tracing::warn!(network = %self.network, path = %self.path.display(),
                            "no usable nameserver in resolv.conf; forwarded queries will get SERVFAIL");
                    } else {
                        tracing::info!(network = %self.network, path = %self.path.display(),
                            "DNS upstreams: {}", ups.describe());
                    }
                    self.stamp = Some(s);
                    self.upstreams = Arc::new(ups);
                    self.stat_failure_logged = false;
                }
                Err(e) => {
                    // Keep the last good list: a resolver being rewritten is briefly unreadable.
                    tracing::warn!(network = %self.network, path = %self.path.display(),
                        "cannot read resolv.conf, keeping the previous upstreams: {e}");
                }
            },
            Err(e) => {
                if self.stamp.is_some() || !self.stat_failure_logged {
                    tracing::warn!(network = %self.network, path = %self.path.display(),
                        "cannot stat resolv.conf, keeping the previous upstreams: {e}");
                }
                // Forget the stamp so that the file is read again once it is back.
                self.stamp = None;
                self.stat_failure_logged = true;
            }
        }
    }
}

/// resolv.conf is a few hundred bytes; more than this is not a resolv.conf, and reading it
/// all would only cost memory.
const MAX_RESOLV_CONF: u64 = 64 * 1024;

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_RESOLV_CONF)
        .read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

    #[test]
    fn parses_servers_in_order_with_defaults() {
        let u = Upstreams::parse(
            "# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver 2001:db8::1 # v6\n\
             nameserver 127.0.0.53\nnameserver bogus\n",
            GW,
        );
        assert_eq!(
            u.servers,
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(u.timeout, DEFAULT_TIMEOUT);
        assert_eq!(u.attempts, DEFAULT_ATTEMPTS);
    }

    #[test]
    fn skips_our_own_address_and_clamps_options() {
        let u = Upstreams::parse(
            "nameserver 10.99.0.1\nnameserver 10.0.0.2\noptions edns0 timeout:30 attempts:9\n",
            GW,
        );
        assert_eq!(u.servers, vec!["10.0.0.2:53".parse().unwrap()]);
        assert_eq!(u.timeout, Duration::from_secs(MAX_TIMEOUT_SECS));
        assert_eq!(u.attempts, MAX_ATTEMPTS);
        let u = Upstreams::parse("options timeout:0 attempts:0\n", GW);
        assert_eq!(u.timeout, Duration::from_secs(1));
        assert_eq!(u.attempts, 1);
    }

    #[test]
    fn ipv6_scope_by_number_and_by_name() {
        let u = Upstreams::parse("nameserver fe80::1%7\nnameserver fe80::2%lo\n", GW);
        assert_eq!(u.servers.len(), 2);
        match u.servers[0] {
            SocketAddr::V6(a) => assert_eq!(a.scope_id(), 7),
            _ => panic!("expected IPv6"),
        }
        match u.servers[1] {
            SocketAddr::V6(a) => assert_ne!(a.scope_id(), 0),
            _ => panic!("expected IPv6"),
        }
    }

    #[test]
    fn follows_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.1\n").unwrap();
        let mut rc = ResolvConf::new(path.clone(), GW, "t".into());
        assert!(rc.current().servers.is_empty());
        rc.refresh();
        assert_eq!(rc.current().servers, vec!["10.0.0.1:53".parse().unwrap()]);
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, "nameserver 10.0.0.2\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        rc.refresh();
        assert_eq!(rc.current().servers, vec!["10.0.0.2:53".parse().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        rc.refresh();
        assert_eq!(rc.current().servers, vec!["10.0.0.2:53".parse().unwrap()]);
        std::fs::write(&path, "nameserver 10.0.0.3\n").unwrap();
        rc.refresh();
        assert_eq!(rc.current().servers, vec!["10.0.0.3:53".parse().unwrap()]);
        // A FIFO in its place is not opened (that would block until a writer came).
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        rc.refresh();
        assert_eq!(rc.current().servers, vec!["10.0.0.3:53".parse().unwrap()]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_publishes_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.1\n").unwrap();
        let (rc, first) = ResolvConf::new(path.clone(), GW, "t".into())
            .refreshed()
            .await;
        assert_eq!(first.servers, vec!["10.0.0.1:53".parse().unwrap()]);
        let (tx, mut rx) = watch::channel(first);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(rc.follow(tx, stop_rx));
        std::fs::write(&path, "nameserver 10.0.0.2\noptions timeout:3\n").unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().servers, vec!["10.0.0.2:53".parse().unwrap()]);
        assert_eq!(rx.borrow().timeout, Duration::from_secs(3));
        stop.send_replace(true);
        task.await.unwrap();
    }
}
