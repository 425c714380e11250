//! The broker's own record of what it made, so a restarted broker can adopt it.
//!
//! One JSON file in the state directory ([`STATE_FILE`]), versioned ([`VERSION`]): each
//! network with the definition it was created from, its subnet, gateway and platform
//! details (the bridge on Linux), and each endpoint handed out on it with its owner uid,
//! guest MAC and persistence. The registry publishes a fresh [`BrokerState`] after every
//! change through a [`StateWriter`]; a single writer task writes the newest one, so a
//! burst of changes costs one write, and the file is replaced atomically (temp file,
//! rename, then fsync of the file and of the directory) on a blocking thread, off the
//! registry's lock and off the runtime's workers.
//!
//! What the file is for decides the order. It describes kernel objects (bridges, TAPs,
//! tables) that live exactly as long as the running kernel, so the file only has to
//! outlive the *process*: once the rename is done, the page cache holds the new file for
//! any next broker, however this one dies. That point is what [`StateWriter::flush`]
//! waits for, so an acquire's reply (which waits for it) costs a write and a rename, not
//! two fsyncs (16 ms p50 on this project's CI disk under load, measured). The fsyncs
//! follow for the power-loss case, where the worst outcome is a file that does not
//! parse: the next broker logs it and cleans up, which is right after a reboot anyway,
//! because nothing the file describes survived it.
//!
//! A file that cannot be read, parsed or has another version is never a reason not to
//! start: the caller logs it and falls back to removing what a previous broker left
//! behind.

use crate::config::NetworkConfig;
use crate::mac::Mac;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{debug, warn};

/// The file's name inside the state directory.
pub const STATE_FILE: &str = "broker-state.json";

/// The format written by this broker. A file with another version is not adopted.
pub const VERSION: u32 = 1;

/// Everything a restarted broker needs to adopt the networks of the previous one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokerState {
    pub version: u32,
    pub networks: Vec<NetworkRecord>,
    /// The connected clients: a client whose connection the service manager hands back
    /// (its fd store) is restored from its record, so its lease never ends.
    #[serde(default)]
    pub clients: Vec<ClientRecord>,
}

impl Default for BrokerState {
    fn default() -> Self {
        Self {
            version: VERSION,
            networks: vec![],
            clients: vec![],
        }
    }
}

/// One connected client, as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Its id, which also names its connection in the service manager's fd store
    /// (`client-<id>`).
    pub id: u64,
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Its supplementary groups (SO_PEERGROUPS), when the kernel told.
    pub groups: Option<Vec<u32>>,
    /// The networks it holds.
    pub networks: Vec<String>,
    /// The endpoints handed to it, as (network, endpoint id).
    pub endpoints: Vec<(String, String)>,
    /// Those of its endpoints that are persistent (removed when it leaves).
    pub persistent: Vec<(String, String)>,
    /// Its dynamic port forwards: made again by the next broker, which serves the same
    /// connection, so they end when that connection does (absent in older files).
    #[serde(default)]
    pub forwards: Vec<ForwardRecord>,
}

/// One dynamic port forward a client holds (protocol request `forward`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRecord {
    pub network: String,
    pub protocol: crate::config::Protocol,
    pub external_port: u16,
    pub internal_port: u16,
    /// The client's endpoint whose guest the forward reaches.
    pub endpoint: String,
}

/// One network as the broker made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The definition it was created from (an active network keeps it across reloads).
    pub config: NetworkConfig,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// What clients were told about the platform side (`bridge` on Linux), for humans;
    /// a backend recomputes what it needs from the config.
    pub platform: Vec<(String, String)>,
    /// The next endpoint serial: names and suggested MACs of new endpoints derive from it,
    /// so an adopted network never reuses one of a live endpoint.
    pub serial: u64,
    pub endpoints: Vec<EndpointRecord>,
}

/// One endpoint handed out on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The backend's name for it (a TAP's name on Linux).
    pub id: String,
    /// The uid it was made for (its owner; the TAP limits count it).
    pub uid: u32,
    /// The guest MAC it was handed out with (the firewall binds the TAP to it).
    pub mac: Mac,
    /// Made to outlive its handle (a VMM opens it by name).
    pub persistent: bool,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a state file of this broker", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format version {found}, this broker reads version {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The path of the state file in `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Reads the state a previous broker left in `dir`: `None` if there is none.
pub fn load(dir: &Path) -> Result<Option<BrokerState>, StateError> {
    let path = path_in(dir);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    // The version first, so a future format is reported as such, not as garbage.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let versioned: Versioned =
        serde_json::from_slice(&text).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
    if versioned.version != VERSION {
        return Err(StateError::Version {
            path,
            found: versioned.version,
        });
    }
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| StateError::Parse { path, source })
}

/// Replaces the state file in `dir` with `state`, atomically: a crash at any point leaves
/// either the old file or the new one, whole. Blocking: run it off the runtime's workers.
pub fn write_atomic(dir: &Path, state: &BrokerState) -> Result<(), StateError> {
    let file = replace(dir, state)?;
    sync(dir, &file)
}

/// Writes `state` to a temp file and renames it over the state file: from here on any
/// later process reads the new state (the page cache outlives this one). Returns the
/// file, for [`sync`].
fn replace(dir: &Path, state: &BrokerState) -> Result<std::fs::File, StateError> {
    let path = path_in(dir);
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let err = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let text = serde_json::to_vec_pretty(state).map_err(|e| err(e.into()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(&text).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(file)
}

/// Makes a [`replace`] durable against power loss: the file's data, then the rename
/// (only durable once the directory is synced).
fn sync(dir: &Path, file: &std::fs::File) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path_in(dir),
        source,
    };
    file.sync_all().map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

/// Builds the state to write: called by the writer task, not by whoever made the change.
/// `None` when there is nothing to record any more (the registry is gone).
pub type Snapshot = Box<dyn Fn() -> Option<BrokerState> + Send + Sync>;

/// Tells the writer task that the state changed. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct StateWriter {
    /// The number of the newest change.
    latest: Arc<watch::Sender<u64>>,
    /// The number of the last change written (or given up on).
    written: watch::Receiver<u64>,
}

impl StateWriter {
    /// Starts the writer task for `dir` (must run inside a tokio runtime); it writes what
    /// `snapshot` returns after each batch of changes.
    pub fn start(dir: PathBuf, snapshot: Snapshot) -> StateWriter {
        let (latest, mut rx) = watch::channel(0u64);
        let (done, written) = watch::channel(0u64);
        let done = Arc::new(done);
        tokio::spawn(async move {
            // Waits for a change, then writes a snapshot taken now: it holds every change
            // numbered up to what was read before it, and those made meanwhile are
            // coalesced into the next write.
            while rx.changed().await.is_ok() {
                let number = *rx.borrow_and_update();
                let Some(state) = snapshot() else { break };
                let dir = dir.clone();
                let signal = Arc::clone(&done);
                // `signal` fires once the rename is in (what a next process reads),
                // before the fsyncs: see the module's note on why that is the point that
                // matters for adoption.
                let result = tokio::task::spawn_blocking(move || {
                    let replaced = replace(&dir, &state);
                    signal.send_replace(number);
                    sync(&dir, &replaced?)
                })
                .await;
                match result {
                    Ok(Ok(())) => debug!(number, "state file written"),
                    Ok(Err(e)) => warn!(
                        "cannot record the broker's state (a restart will not adopt the \
                         current networks): {}",
                        crate::error::chain(&e)
                    ),
                    Err(e) => {
                        warn!("state writer failed: {e}");
                        done.send_replace(number);
                    }
                }
            }
        });
        StateWriter {
            latest: Arc::new(latest),
            written,
        }
    }

    /// Notes that the state changed; the writer task records it soon.
    pub fn changed(&self) {
        self.latest.send_modify(|number| *number += 1);
    }

    /// Waits until everything changed so far is in the state file as any next process
    /// reads it (renamed into place; the fsyncs may still run), or failed, logged.
    pub async fn flush(&self) {
        let target = *self.latest.borrow();
        let mut written = self.written.clone();
        let _ = written.wait_for(|n| *n >= target).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BrokerState {
        let config = crate::config::ConfigDir::new(PathBuf::from("/nonexistent"))
            .load("shared")
            .expect("built-in")
            .expect("shared is built in");
        BrokerState {
            version: VERSION,
            clients: vec![ClientRecord {
                id: 7,
                pid: 42,
                uid: 1000,
                gid: 1000,
                groups: Some(vec![1000, 27]),
                networks: vec!["shared".into()],
                endpoints: vec![("shared".into(), "vmnt1x2".into())],
                persistent: vec![("shared".into(), "vmnt1x2".into())],
                forwards: vec![ForwardRecord {
                    network: "shared".into(),
                    protocol: crate::config::Protocol::Tcp,
                    external_port: 2222,
                    internal_port: 22,
                    endpoint: "vmnt1x2".into(),
                }],
            }],
            networks: vec![NetworkRecord {
                config,
                subnet: "192.168.64.0/24".parse().unwrap(),
                gateway: "192.168.64.1".parse().unwrap(),
                platform: vec![("bridge".into(), "vmnbr0".into())],
                serial: 3,
                endpoints: vec![EndpointRecord {
                    id: "vmnt1x2".into(),
                    uid: 1000,
                    mac: Mac::from([0x52, 0, 0, 0, 0, 2]),
                    persistent: true,
                }],
            }],
        }
    }

    #[test]
    fn round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let state = sample();
        write_atomic(dir.path(), &state).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(state));
        write_atomic(dir.path(), &BrokerState::default()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(BrokerState::default()));
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn a_client_record_without_forwards_still_reads() {
        let old = r#"{"version": 1, "networks": [], "clients": [{"id": 1, "pid": 2, "uid": 3,
            "gid": 4, "groups": null, "networks": [], "endpoints": [], "persistent": []}]}"#;
        let state: BrokerState = serde_json::from_str(old).unwrap();
        assert!(state.clients[0].forwards.is_empty());
    }

    #[test]
    fn corrupt_and_foreign_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path_in(dir.path()), "{\"version\": 1, \"networks\": [{").unwrap();
        assert!(matches!(load(dir.path()), Err(StateError::Parse { .. })));
        std::fs::write(path_in(dir.path()), "not json").unwrap();
        assert!(matches!(load(dir.path()), Err(StateError::Parse { .. })));
        std::fs::write(path_in(dir.path()), "{\"version\": 99, \"x\": 1}").unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(StateError::Version { found: 99, .. })
        ));
    }

    #[tokio::test]
    async fn the_writer_writes_the_newest_state() {
        let dir = tempfile::tempdir().unwrap();
        let current = Arc::new(std::sync::Mutex::new(BrokerState::default()));
        let source = Arc::clone(&current);
        let writer = StateWriter::start(
            dir.path().to_path_buf(),
            Box::new(move || Some(source.lock().unwrap().clone())),
        );
        writer.changed();
        writer.flush().await;
        assert_eq!(load(dir.path()).unwrap(), Some(BrokerState::default()));
        // Two changes in a row: the state as of the second is what ends up written.
        *current.lock().unwrap() = BrokerState {
            clients: vec![],
            ..sample()
        };
        writer.changed();
        let state = sample();
        *current.lock().unwrap() = state.clone();
        writer.changed();
        writer.flush().await;
        assert_eq!(load(dir.path()).unwrap(), Some(state));
    }
}
