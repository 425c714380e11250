//! The broker's own record of what it made, so a restarted broker can adopt it.
//!
//! One file in the state directory ([`STATE_FILE`]), versioned ([`VERSION`]), holding
//! each network with the definition it was created from, its subnet, gateway and
//! platform details (the bridge on Linux), each endpoint handed out on it with its owner
//! uid, guest MAC and persistence, and each connected client. Its layout is a journal:
//!
//! - the first line is a whole [`BrokerState`] (compact JSON), the *base*;
//! - every further line is one [`Entry`]: a network, endpoint or client added, changed
//!   or gone. Reading replays them over the base in order.
//!
//! The registry marks what each change touched ([`Key`]); one writer at a time (the
//! background task, or an acquire that needs its record before its reply) turns the marks
//! of a burst of changes into entries ([`Delta::Entries`]) and appends them in one
//! write, so an acquire costs a few hundred bytes however many networks, TAPs and clients
//! there are (before, every change rewrote the whole state: O(n) per acquire, O(n²) for n
//! clients). Once the journal has grown past [`COMPACT_FACTOR`] times the base (and
//! [`COMPACT_MIN`]), the next batch is written as a new base ([`Delta::Full`]) into a
//! temp file renamed over the old one, so the file stays within a constant factor of the
//! live state at an amortized constant cost per change.
//!
//! What the file is for decides the order. It describes kernel objects (bridges, TAPs,
//! tables) that live exactly as long as the running kernel, so the file only has to
//! outlive the *process*: once an append or a rename is done, the page cache holds it for
//! any next broker, however this one dies. That point is what [`StateWriter::flush`]
//! waits for, so an acquire's reply (which waits for it) costs one `write`, not an
//! fsync (16 ms p50 on this project's CI disk under load, measured, and each one made
//! the next append wait for the journal commit). Nothing is fsynced: after a power loss
//! the kernel objects the file describes are gone too. A crash can leave a torn last
//! line (a `write` cut short) or, after a power loss, garbage in place of appended lines: replay stops at the first line
//! that does not parse, logs it, and adopts what came before, which is every change whose
//! reply was sent (the process's appends are complete in the page cache), or after a
//! reboot what nothing needs any more. The writer's first batch is always a new base, so
//! nothing is ever appended after such a tail.
//!
//! A file in the old layout (version 1: one pretty-printed [`BrokerState`], rewritten on
//! every change) is read as the base with no journal, and replaced by the first write.
//!
//! A file that cannot be read, parsed or has another version is never a reason not to
//! start: the caller logs it and falls back to removing what a previous broker left
//! behind.

use crate::config::NetworkConfig;
use crate::mac::Mac;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{debug, warn};

/// The file's name inside the state directory.
pub const STATE_FILE: &str = "broker-state.json";

/// The format written by this broker (2: the journal). A file with another version is
/// not adopted, except version 1 ([`VERSION_SINGLE`]), which is converted.
pub const VERSION: u32 = 2;

/// The previous format: the whole state in one JSON document, rewritten on every change.
pub const VERSION_SINGLE: u32 = 1;

/// The journal is compacted into a new base once it is this many times the base's size...
pub const COMPACT_FACTOR: u64 = 4;

/// ...and at least this large (bytes), so a small state is not rewritten all the time.
pub const COMPACT_MIN: u64 = 256 * 1024;

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

/// One change, a line of the journal after the base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// A network as it is now, with its endpoints: replaces any recorded under its name.
    Network(Box<NetworkRecord>),
    /// The network is gone (or no longer active), with its endpoints.
    NetworkGone(String),
    /// An endpoint handed out (or changed) on a recorded network, and that network's
    /// next serial after it.
    Endpoint {
        network: String,
        serial: u64,
        endpoint: EndpointRecord,
    },
    /// An endpoint forgotten (its TAP is gone).
    EndpointGone { network: String, id: String },
    /// A client as it is now: replaces any recorded under its id.
    Client(ClientRecord),
    /// The client left.
    ClientGone(u64),
}

/// What a change touched, as the registry marks it for the writer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A whole network (created, adopted, its definition changed, removed).
    Network(String),
    /// One endpoint of a network, as (network, endpoint id).
    Endpoint(String, String),
    /// One client, by id.
    Client(u64),
}

/// The marks since the last write.
#[derive(Debug, Default)]
pub struct Changes {
    /// Everything may have changed: write a new base.
    pub all: bool,
    pub keys: BTreeSet<Key>,
}

impl Changes {
    pub fn mark(&mut self, key: Key) {
        if !self.all {
            self.keys.insert(key);
        }
    }

    pub fn mark_all(&mut self) {
        self.all = true;
        self.keys.clear();
    }

    /// Takes the marks, leaving none.
    pub fn take(&mut self) -> Changes {
        std::mem::take(self)
    }
}

/// What the writer records for a batch of changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// A new base: the whole state.
    Full(BrokerState),
    /// Entries to append.
    Entries(Vec<Entry>),
}

/// The state as replayed, keyed for the entries' lookups.
#[derive(Default)]
struct Replay {
    networks: BTreeMap<String, (NetworkRecord, BTreeMap<String, EndpointRecord>)>,
    clients: BTreeMap<u64, ClientRecord>,
}

impl Replay {
    fn new(base: BrokerState) -> Self {
        let mut replay = Replay::default();
        for n in base.networks {
            replay.apply(Entry::Network(Box::new(n)));
        }
        for c in base.clients {
            replay.apply(Entry::Client(c));
        }
        replay
    }

    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Network(mut n) => {
                let endpoints = std::mem::take(&mut n.endpoints)
                    .into_iter()
                    .map(|e| (e.id.clone(), e))
                    .collect();
                self.networks.insert(n.config.name.clone(), (*n, endpoints));
            }
            Entry::NetworkGone(name) => {
                self.networks.remove(&name);
            }
            Entry::Endpoint {
                network,
                serial,
                endpoint,
            } => {
                // An endpoint of a network not recorded (any more) has nothing to adopt.
                if let Some((n, endpoints)) = self.networks.get_mut(&network) {
                    n.serial = n.serial.max(serial);
                    endpoints.insert(endpoint.id.clone(), endpoint);
                }
            }
            Entry::EndpointGone { network, id } => {
                if let Some((_, endpoints)) = self.networks.get_mut(&network) {
                    endpoints.remove(&id);
                }
            }
            Entry::Client(c) => {
                self.clients.insert(c.id, c);
            }
            Entry::ClientGone(id) => {
                self.clients.remove(&id);
            }
        }
    }

    fn finish(self) -> BrokerState {
        BrokerState {
            version: VERSION,
            networks: self
                .networks
                .into_values()
                .map(|(mut n, endpoints)| {
                    n.endpoints = endpoints.into_values().collect();
                    n
                })
                .collect(),
            clients: self.clients.into_values().collect(),
        }
    }
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
    let parse = |bytes: &[u8]| -> Result<BrokerState, StateError> {
        let versioned: Versioned =
            serde_json::from_slice(bytes).map_err(|source| StateError::Parse {
                path: path.clone(),
                source,
            })?;
        if versioned.version != VERSION && versioned.version != VERSION_SINGLE {
            return Err(StateError::Version {
                path: path.clone(),
                found: versioned.version,
            });
        }
        let mut state: BrokerState =
            serde_json::from_slice(bytes).map_err(|source| StateError::Parse {
                path: path.clone(),
                source,
            })?;
        state.version = VERSION;
        Ok(state)
    };
    // The journal's base is its first line; the old layout is one document over many
    // lines, which does not parse line by line.
    let (first, rest) = match text.iter().position(|b| *b == b'\n') {
        Some(end) => (&text[..end], &text[end + 1..]),
        None => (&text[..], &[][..]),
    };
    let base = match parse(first) {
        Ok(base) => base,
        Err(StateError::Parse { .. }) if !rest.is_empty() => {
            let old = parse(&text)?;
            debug!(path = %path.display(), "state file in the single-document layout: converting it");
            return Ok(Some(old));
        }
        Err(e) => return Err(e),
    };
    let mut replay = Replay::new(base);
    for (number, line) in rest.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(entry) => replay.apply(entry),
            Err(e) => {
                // A torn append (crash mid-write) or what a power loss left: everything
                // before it is whole, and nothing is ever appended after it.
                warn!(
                    path = %path.display(),
                    line = number + 2,
                    "ignoring the state file's journal from a line that does not parse: {e}"
                );
                break;
            }
        }
    }
    Ok(Some(replay.finish()))
}

/// Replaces the state file in `dir` with `state` as a new base, atomically: a crash at
/// any point leaves either the old file or the new one, whole. Blocking: run it off the
/// runtime's workers.
pub fn write_atomic(dir: &Path, state: &BrokerState) -> Result<(), StateError> {
    let (file, _) = replace(dir, state)?;
    sync(dir, &file)
}

/// Writes `state` as a new base to a temp file and renames it over the state file: from
/// here on any later process reads the new state (the page cache outlives this one).
/// Returns the file, open for appending entries, and its size.
fn replace(dir: &Path, state: &BrokerState) -> Result<(std::fs::File, u64), StateError> {
    let path = path_in(dir);
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let err = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let mut text = serde_json::to_vec(state).map_err(|e| err(e.into()))?;
    text.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&tmp)
        .map_err(err)?;
    file.set_len(0).map_err(err)?;
    file.write_all(&text).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok((file, text.len() as u64))
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

/// Builds what to write for the changes marked since the last call: called by the
/// writer task, not by whoever made the change. `full` asks for a new base whatever the
/// marks. `None` when there is nothing to record any more (the registry is gone).
pub type Snapshot = Box<dyn Fn(bool) -> Option<Delta> + Send + Sync>;

/// The open state file and how large its parts are.
struct Journal {
    file: std::fs::File,
    base: u64,
    appended: u64,
}

/// At most this many bytes of entries are appended on a runtime worker, by whoever
/// flushes ([`StateWriter::flush`]); a larger batch, and every new base, is written on a
/// blocking thread.
const INLINE_APPEND_MAX: usize = 64 * 1024;

/// Records the state as it changes. Cheap to clone; [`Self::changed`] never blocks.
///
/// A change is written soon by a background task, or at once by the first caller of
/// [`Self::flush`] that needs it: an acquire waits for its own record before its reply,
/// and handing that write to another task and a blocking thread cost two wake-ups, more
/// than the write itself (a few hundred bytes into the page cache, like one log line).
#[derive(Clone)]
pub struct StateWriter {
    /// The number of the newest change.
    latest: Arc<watch::Sender<u64>>,
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    snapshot: Snapshot,
    /// The one writer at a time, with the open file (`None` until the first base is
    /// written, or after a failed write: the next write is a new base). Held across
    /// the write by design: whoever waits for it needs that write, or the next one.
    journal: tokio::sync::Mutex<Option<Journal>>,
    /// The number of the last change written (or given up on).
    written: watch::Sender<u64>,
    /// The registry is gone: nothing more to write.
    ended: std::sync::atomic::AtomicBool,
}

impl StateWriter {
    /// Starts the background writer for `dir` (must run inside a tokio runtime); every
    /// write records what `snapshot` returns. The first write is a new base.
    pub fn start(dir: PathBuf, snapshot: Snapshot) -> StateWriter {
        let (latest, mut rx) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            dir,
            snapshot,
            journal: tokio::sync::Mutex::new(None),
            written: watch::Sender::new(0),
            ended: std::sync::atomic::AtomicBool::new(false),
        });
        let background = Arc::clone(&shared);
        tokio::spawn(async move {
            // Waits for a change, then writes what was marked until now; changes made
            // meanwhile are coalesced into the next write.
            while rx.changed().await.is_ok() {
                let number = *rx.borrow_and_update();
                if !background.write_up_to(number).await {
                    break;
                }
            }
        });
        StateWriter {
            latest: Arc::new(latest),
            shared,
        }
    }

    /// Notes that the state changed; it is written soon.
    pub fn changed(&self) {
        self.latest.send_modify(|number| *number += 1);
    }

    /// Notes a change that its caller writes itself ([`Self::flush`]) before anyone
    /// hears of it: counted, so the flush covers it, but the background writer is not
    /// woken for it (a wake is another thread, often on the other CPU, while the caller
    /// still has a reply to send). Should the flush not come, the next change anyone
    /// notes with [`Self::changed`] carries it.
    pub fn changed_for_flush(&self) {
        self.latest.send_if_modified(|number| {
            *number += 1;
            false
        });
    }

    /// Returns once everything changed so far is in the state file as any next process
    /// reads it (appended, or renamed into place: the module's note says why nothing
    /// more is needed), or failed, logged. Writes it itself if nobody is writing it yet.
    pub async fn flush(&self) {
        let target = *self.latest.borrow();
        self.shared.write_up_to(target).await;
    }
}

impl Shared {
    /// Writes, unless already written, every change up to `target` (and whatever else
    /// was marked by the time the write starts). False once the registry is gone.
    async fn write_up_to(&self, target: u64) -> bool {
        if *self.written.borrow() >= target {
            return true;
        }
        let mut journal = self.journal.lock().await;
        // Whoever held the lock before may have written it meanwhile.
        if *self.written.borrow() >= target {
            return true;
        }
        if self.ended.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        // Every change numbered up to here is marked already: the snapshot holds them.
        let number = target.max(*self.written.borrow());
        let full = match journal.as_ref() {
            None => true,
            Some(j) => j.appended > COMPACT_MIN.max(COMPACT_FACTOR * j.base),
        };
        let Some(delta) = (self.snapshot)(full) else {
            self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
            // Nobody waits for a write that will never come.
            self.written.send_replace(u64::MAX);
            return false;
        };
        let current = journal.take();
        let result = match delta {
            Delta::Entries(entries) => match serialize(&self.dir, &entries) {
                Ok(text) if text.len() <= INLINE_APPEND_MAX => {
                    Ok(write_delta(&self.dir, current, Batch::Append(text)))
                }
                Ok(text) => self.off_runtime(current, Batch::Append(text)).await,
                Err(e) => Ok(Err(e)),
            },
            Delta::Full(state) => self.off_runtime(current, Batch::Base(state)).await,
        };
        match result {
            Ok(Ok(next)) => {
                *journal = Some(next);
                debug!(number, "state file written");
            }
            Ok(Err(e)) => warn!(
                "cannot record the broker's state (a restart will not adopt the current \
                 networks): {}",
                crate::error::chain(&e)
            ),
            Err(e) => warn!("state writer failed: {e}"),
        }
        self.written.send_modify(|n| *n = (*n).max(number));
        true
    }

    /// Writes `batch` on a blocking thread.
    async fn off_runtime(
        &self,
        current: Option<Journal>,
        batch: Batch,
    ) -> Result<Result<Journal, StateError>, tokio::task::JoinError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_delta(&dir, current, batch)).await
    }
}

/// What one write puts in the file.
enum Batch {
    /// Serialized entries, one per line.
    Append(Vec<u8>),
    Base(BrokerState),
}

/// The journal lines of `entries`.
fn serialize(dir: &Path, entries: &[Entry]) -> Result<Vec<u8>, StateError> {
    let mut text = Vec::with_capacity(entries.len() * 256);
    for entry in entries {
        serde_json::to_writer(&mut text, entry).map_err(|e| StateError::Write {
            path: path_in(dir),
            source: e.into(),
        })?;
        text.push(b'\n');
    }
    Ok(text)
}

/// Writes one batch: a new base, or entries appended to the journal (`journal`, `None`
/// if there is no base yet). A failed write returns no journal, so the next batch
/// writes a new base (the file may hold a torn line now, and this batch's marks are
/// spent). Returns the journal to keep.
fn write_delta(dir: &Path, journal: Option<Journal>, batch: Batch) -> Result<Journal, StateError> {
    match (batch, journal) {
        (Batch::Append(text), Some(mut j)) => {
            if !text.is_empty() {
                (&j.file)
                    .write_all(&text)
                    .map_err(|source| StateError::Write {
                        path: path_in(dir),
                        source,
                    })?;
                j.appended += text.len() as u64;
            }
            Ok(j)
        }
        (Batch::Base(state), _) => {
            let (file, base) = replace(dir, &state)?;
            Ok(Journal {
                file,
                base,
                appended: 0,
            })
        }
        // Entries with no base to append to: the snapshot was asked for a full one; a
        // bug in the caller, not a state to record half of.
        (Batch::Append(_), None) => Err(StateError::Write {
            path: path_in(dir),
            source: std::io::Error::other("entries without a base"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `entries` as the writer does ([`serialize`], one write).
    fn append(dir: &Path, mut file: &std::fs::File, entries: &[Entry]) -> std::io::Result<()> {
        let text = serialize(dir, entries).map_err(std::io::Error::other)?;
        file.write_all(&text)
    }

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

    /// A writer over a state the test changes: full snapshots of `current`, entries
    /// from `pending`.
    type Source = Arc<std::sync::Mutex<(BrokerState, Vec<Entry>, usize)>>;

    fn writer_over(dir: &Path, source: &Source) -> StateWriter {
        let source = Arc::clone(source);
        StateWriter::start(
            dir.to_path_buf(),
            Box::new(move |full| {
                let mut s = source.lock().unwrap();
                let entries = std::mem::take(&mut s.1);
                if full {
                    s.2 += 1;
                    Some(Delta::Full(s.0.clone()))
                } else {
                    Some(Delta::Entries(entries))
                }
            }),
        )
    }

    #[tokio::test]
    async fn the_writer_writes_the_newest_state() {
        let dir = tempfile::tempdir().unwrap();
        let source: Source = Default::default();
        let writer = writer_over(dir.path(), &source);
        writer.changed();
        writer.flush().await;
        assert_eq!(load(dir.path()).unwrap(), Some(BrokerState::default()));
        // Changes after the base are appended as entries and replayed over it.
        let state = sample();
        {
            let mut s = source.lock().unwrap();
            s.0 = state.clone();
            s.1 = vec![Entry::Network(Box::new(state.networks[0].clone()))];
        }
        writer.changed();
        writer.flush().await;
        {
            let mut s = source.lock().unwrap();
            s.1 = vec![Entry::Client(state.clients[0].clone())];
        }
        writer.changed();
        writer.flush().await;
        assert_eq!(load(dir.path()).unwrap(), Some(state));
        let text = std::fs::read_to_string(path_in(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 3, "a base and two entries:\n{text}");
        assert_eq!(source.lock().unwrap().2, 1, "one base written");
    }

    #[test]
    fn entries_replay_over_the_base_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample();
        write_atomic(dir.path(), &state).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(path_in(dir.path()))
            .unwrap();
        let new = EndpointRecord {
            id: "vmnt1x5".into(),
            uid: 1001,
            mac: Mac::from([0x52, 0, 0, 0, 0, 5]),
            persistent: false,
        };
        let second = ClientRecord {
            id: 8,
            networks: vec![],
            endpoints: vec![],
            persistent: vec![],
            ..state.clients[0].clone()
        };
        append(
            dir.path(),
            &file,
            &[
                Entry::Endpoint {
                    network: "shared".into(),
                    serial: 6,
                    endpoint: new.clone(),
                },
                Entry::EndpointGone {
                    network: "shared".into(),
                    id: "vmnt1x2".into(),
                },
                // An endpoint of an unknown network is dropped, not a reason to fail.
                Entry::Endpoint {
                    network: "gone".into(),
                    serial: 1,
                    endpoint: new.clone(),
                },
                Entry::Client(second.clone()),
                Entry::ClientGone(7),
            ],
        )
        .unwrap();
        file.flush().unwrap();
        let mut expected = state.clone();
        expected.networks[0].serial = 6;
        expected.networks[0].endpoints = vec![new];
        expected.clients = vec![second];
        assert_eq!(load(dir.path()).unwrap(), Some(expected));
        // A network gone takes its endpoints; recorded anew, it has only its own.
        append(
            dir.path(),
            &file,
            &[
                Entry::NetworkGone("shared".into()),
                Entry::Network(Box::new(NetworkRecord {
                    endpoints: vec![],
                    ..state.networks[0].clone()
                })),
            ],
        )
        .unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.networks.len(), 1);
        assert_eq!(loaded.networks[0].endpoints, vec![]);
        assert_eq!(loaded.networks[0].serial, 3);
    }

    #[test]
    fn a_torn_or_garbled_tail_is_ignored_and_what_came_before_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = sample();
        let client = state.clients.pop().unwrap();
        write_atomic(dir.path(), &state).unwrap();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path_in(dir.path()))
            .unwrap();
        append(dir.path(), &file, &[Entry::Client(client.clone())]).unwrap();
        let whole = std::fs::read(path_in(dir.path())).unwrap();
        let mut expected = state.clone();
        expected.clients.push(client.clone());
        // A write cut short: half a line, no newline.
        let entry = serde_json::to_vec(&Entry::ClientGone(client.id)).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(&entry[..entry.len() / 2]);
        std::fs::write(path_in(dir.path()), &torn).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(expected.clone()));
        // What a power loss may leave of appended data: zeros, then more lines. Nothing
        // after the first bad line is applied.
        let mut garbled = whole.clone();
        garbled.extend_from_slice(&[0; 40]);
        garbled.push(b'\n');
        garbled.extend_from_slice(&entry);
        garbled.push(b'\n');
        std::fs::write(path_in(dir.path()), &garbled).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(expected));
        // A broken base is no state at all.
        std::fs::write(path_in(dir.path()), &whole[..whole.len() / 3]).unwrap();
        assert!(matches!(load(dir.path()), Err(StateError::Parse { .. })));
    }

    /// A change noted for its caller's own flush (an acquire's) wakes no background
    /// write, and the flush writes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_for_flush_is_written_by_the_flush_alone() {
        let dir = tempfile::tempdir().unwrap();
        let source: Source = Default::default();
        let writer = writer_over(dir.path(), &source);
        writer.changed_for_flush();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !path_in(dir.path()).exists(),
            "the background writer wrote a change nobody woke it for"
        );
        writer.flush().await;
        assert_eq!(load(dir.path()).unwrap(), Some(BrokerState::default()));
    }

    #[tokio::test]
    async fn a_file_in_the_single_document_layout_is_read_and_converted() {
        let dir = tempfile::tempdir().unwrap();
        // Exactly what the previous broker wrote: version 1, pretty-printed.
        let state = sample();
        let mut old = serde_json::to_value(&state).unwrap();
        old["version"] = 1.into();
        let text = serde_json::to_vec_pretty(&old).unwrap();
        assert!(text.iter().filter(|b| **b == b'\n').count() > 10);
        std::fs::write(path_in(dir.path()), &text).unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, state, "read as the current version");
        // The first write replaces it with a base in the journal layout, and a change
        // after it is an entry.
        let source: Source = Arc::new(std::sync::Mutex::new((loaded, vec![], 0)));
        let writer = writer_over(dir.path(), &source);
        writer.changed();
        writer.flush().await;
        source.lock().unwrap().1 = vec![Entry::ClientGone(7)];
        writer.changed();
        writer.flush().await;
        let text = std::fs::read_to_string(path_in(dir.path())).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("{\"version\":2"), "{text}");
        let mut expected = state;
        expected.clients.clear();
        assert_eq!(load(dir.path()).unwrap(), Some(expected));
    }

    /// Many tasks change the state and flush at once, on several threads: each flush
    /// returns only once its own change is in the file, whichever of them (or the
    /// background task) wrote it, and the file replays to the last state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_flushes_each_find_their_change_written() {
        let dir = tempfile::tempdir().unwrap();
        let source: Source = Default::default();
        let writer = writer_over(dir.path(), &source);
        let client = sample().clients[0].clone();
        let tasks: Vec<_> = (0..64u64)
            .map(|id| {
                let (writer, source, client) =
                    (writer.clone(), Arc::clone(&source), client.clone());
                let path = path_in(dir.path());
                tokio::spawn(async move {
                    let record = ClientRecord { id, ..client };
                    {
                        let mut s = source.lock().unwrap();
                        s.0.clients.push(record.clone());
                        s.0.clients.sort_by_key(|c| c.id);
                        s.1.push(Entry::Client(record));
                    }
                    writer.changed();
                    writer.flush().await;
                    let text = std::fs::read_to_string(&path).unwrap();
                    assert!(
                        text.contains(&format!("\"id\":{id},")),
                        "client {id} is in the file once its flush returned"
                    );
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (state, _, _) = source.lock().unwrap().clone();
        assert_eq!(state.clients.len(), 64);
        assert_eq!(load(dir.path()).unwrap(), Some(state));
    }

    /// Once the registry is gone (the snapshot returns nothing), a flush returns at once
    /// instead of waiting for a write that will never come.
    #[tokio::test]
    async fn a_flush_after_the_registry_is_gone_returns() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StateWriter::start(dir.path().to_path_buf(), Box::new(|_| None));
        writer.changed();
        tokio::time::timeout(std::time::Duration::from_secs(30), writer.flush())
            .await
            .expect("the flush returned");
        writer.changed();
        tokio::time::timeout(std::time::Duration::from_secs(30), writer.flush())
            .await
            .expect("and so does the next");
        assert!(!path_in(dir.path()).exists());
    }

    #[tokio::test]
    async fn the_journal_is_compacted_once_it_outgrows_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let source: Source = Default::default();
        let writer = writer_over(dir.path(), &source);
        let client = sample().clients[0].clone();
        let size = || std::fs::metadata(path_in(dir.path())).unwrap().len();
        let mut largest = 0;
        // Clients come and go, at most 10 at once: the live state stays small, the
        // changes add up to far more than COMPACT_MIN.
        for i in 0..2500u64 {
            {
                let mut s = source.lock().unwrap();
                let id = i % 10;
                let record = ClientRecord {
                    id,
                    pid: i as i32,
                    ..client.clone()
                };
                s.0.clients.retain(|c| c.id != id);
                s.0.clients.push(record.clone());
                s.0.clients.sort_by_key(|c| c.id);
                s.1.push(Entry::Client(record));
            }
            writer.changed();
            writer.flush().await;
            largest = largest.max(size());
        }
        let (state, _, bases) = source.lock().unwrap().clone();
        assert_eq!(load(dir.path()).unwrap(), Some(state));
        assert!(bases >= 2, "compacted: {bases} bases written");
        assert!(
            largest <= COMPACT_MIN + 64 * 1024,
            "the file stayed within the bound: {largest} bytes"
        );
        assert!(
            bases < 100,
            "not compacted on every change: {bases} bases for 2500 changes"
        );
    }
}
