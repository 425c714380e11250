//! The one record of the broker's live links (its bridges and TAPs), kept from the kernel's
//! link events (RTNLGRP_LINK) rather than from dumps taken whenever someone asks.
//!
//! A task subscribes to the events, takes one dump, and from then on applies every
//! RTM_NEWLINK/RTM_DELLINK. Only links carrying the broker's alias
//! ([`super::ALIAS_PREFIX`]) are kept. A TAP that leaves (its VM closed it, or someone
//! deleted it) is reported on a channel, which is how the firewall forgets its binding.
//!
//! The kernel does not wait for a reader of events: when the socket's buffer is full it
//! drops them and the next read fails with ENOBUFS. From then until a fresh dump has been
//! taken the record is *not synced*, and every query fails with
//! [`RecordError::NotSynced`] instead of answering from a set that may miss links or keep
//! dead ones: callers keep what they have (MACs in use, counts, bindings) rather than
//! clear it.
//!
//! Queries first pass a barrier ([`LinkRecord::sync`]): a request on the event socket,
//! whose answer the kernel queues behind every event already sent. The kernel sends a
//! link's event before it acknowledges the change, so once the barrier is through, every
//! change made before the query (a TAP just plugged, one just deleted) is in the record.

use super::ALIAS_PREFIX;
use super::netlink::{Link, Netlink};
use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use rtnetlink::{Handle, MulticastGroup};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Receive buffer asked for the event socket. A burst of TAPs closing at once (a host
/// shutting down a hundred VMs) sends a few messages of about 1.5 KiB per TAP; 4 MiB
/// holds thousands. Set with SO_RCVBUFFORCE (the broker has CAP_NET_ADMIN) so
/// `net.core.rmem_max` does not cap it; an overflow is still handled, only rarer.
pub const EVENT_BUFFER: usize = 4 << 20;

/// How long a barrier waits for its answer. The answer can be lost only when the event
/// socket overflows, which the record then reports anyway; this bounds the wait if the
/// overflow notice itself was lost.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between attempts to take the resync dump after a failure.
const RESYNC_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "the record of live links is not in sync with the kernel (link events were lost); \
         a fresh dump is being taken"
    )]
    NotSynced,
    #[error("the link event monitor has stopped")]
    Stopped,
    #[error("cannot open the netlink link monitor")]
    Open(#[source] io::Error),
}

impl From<RecordError> for io::Error {
    fn from(e: RecordError) -> Self {
        io::Error::other(e)
    }
}

/// What the task and the queries share.
#[derive(Debug, Default)]
struct State {
    synced: bool,
    /// The task ended: nothing will ever update the record again.
    stopped: bool,
    /// Links with the broker's alias, by index.
    links: BTreeMap<u32, Link>,
    /// Fresh dumps taken after lost events, for logs and tests.
    resyncs: u64,
}

impl State {
    fn check(&self) -> Result<(), RecordError> {
        if self.stopped {
            Err(RecordError::Stopped)
        } else if !self.synced {
            Err(RecordError::NotSynced)
        } else {
            Ok(())
        }
    }

    /// Applies one link event; returns the link that left the record, if one did, and
    /// the broker's TAP it reports closed ([`is_silent_tap`]), if it does. Takes the
    /// message by value: a TAP's life sends a dozen of these, each of some 1.5 KiB of
    /// attributes, and a copy of each showed in the broker's profile.
    fn apply(&mut self, message: RouteNetlinkMessage) -> Applied {
        match message {
            // Bridges also send AF_BRIDGE NEWLINK/DELLINK about their ports (a port
            // leaving is a DELLINK of a link that still exists): only the generic
            // (AF_UNSPEC) messages describe a link's life.
            RouteNetlinkMessage::NewLink(m)
                if m.header.interface_family == AddressFamily::Unspec =>
            {
                let link = Link::from_message(m);
                if is_ours(&link) {
                    let silent = is_silent_tap(&link).then(|| link.clone());
                    self.links.insert(link.index, link);
                    Applied { gone: None, silent }
                } else {
                    // Its alias was changed or removed: no longer the broker's.
                    Applied {
                        gone: self.links.remove(&link.index),
                        silent: None,
                    }
                }
            }
            RouteNetlinkMessage::DelLink(m)
                if m.header.interface_family == AddressFamily::Unspec =>
            {
                Applied {
                    gone: self.links.remove(&m.header.index),
                    silent: None,
                }
            }
            _ => Applied::default(),
        }
    }

    /// Replaces the record by a fresh dump; returns the links that are gone since.
    fn replace(&mut self, dumped: Vec<Link>) -> Vec<Link> {
        let fresh: BTreeMap<u32, Link> = dumped
            .into_iter()
            .filter(is_ours)
            .map(|l| (l.index, l))
            .collect();
        let old = std::mem::replace(&mut self.links, fresh);
        self.synced = true;
        old.into_values()
            .filter(|l| self.links.get(&l.index).is_none_or(|n| n.name != l.name))
            .collect()
    }
}

/// What one link event did to the record ([`State::apply`]).
#[derive(Debug, Default)]
struct Applied {
    gone: Option<Link>,
    silent: Option<Link>,
}

fn is_ours(link: &Link) -> bool {
    link.alias
        .as_deref()
        .is_some_and(|a| a.starts_with(ALIAS_PREFIX))
}

/// The live links of the broker, kept by a task that lives as long as this value.
pub struct LinkRecord {
    state: Arc<Mutex<State>>,
    barriers: mpsc::UnboundedSender<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for LinkRecord {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Receives the links that left the record (closed or deleted TAPs, removed bridges).
pub type Departures = mpsc::UnboundedReceiver<Link>;

/// Receives the broker's TAPs that lost carrier: the last fd attached to them closed
/// (its VM exited). A TAP the broker made persistent stays until someone deletes it.
pub type CarrierLosses = mpsc::UnboundedReceiver<Link>;

impl LinkRecord {
    /// Subscribes to link events in the calling thread's network namespace and starts
    /// the task that keeps the record; `dumps` takes the initial and resync dumps. Needs
    /// a tokio runtime.
    pub fn start(
        dumps: Arc<Netlink>,
    ) -> Result<(LinkRecord, Departures, CarrierLosses), RecordError> {
        Self::start_with_buffer(dumps, EVENT_BUFFER)
    }

    /// [`LinkRecord::start`] with an event socket buffer of `bytes` (tests use a tiny one
    /// to make the kernel drop events).
    pub fn start_with_buffer(
        dumps: Arc<Netlink>,
        bytes: usize,
    ) -> Result<(LinkRecord, Departures, CarrierLosses), RecordError> {
        let (mut connection, handle, events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .map_err(RecordError::Open)?;
        set_receive_buffer(connection.socket_mut().socket_mut(), bytes)
            .map_err(RecordError::Open)?;
        let connection = tokio::spawn(connection);
        let state = Arc::new(Mutex::new(State::default()));
        let (barriers, barrier_rx) = mpsc::unbounded_channel();
        let (departed, departures) = mpsc::unbounded_channel();
        let (silenced, losses) = mpsc::unbounded_channel();
        let task = Keeper {
            state: Arc::clone(&state),
            dumps,
            handle,
            events,
            departed,
            silenced,
        };
        let task = tokio::spawn(async move {
            task.run(barrier_rx).await;
            connection.abort();
        });
        Ok((
            LinkRecord {
                state,
                barriers,
                task,
            },
            departures,
            losses,
        ))
    }

    /// Waits until every link change the kernel made before this call is in the record;
    /// fails while the record is not synced.
    pub async fn sync(&self) -> Result<(), RecordError> {
        let (done, wait) = oneshot::channel();
        self.barriers.send(done).map_err(|_| RecordError::Stopped)?;
        wait.await.map_err(|_| RecordError::Stopped)?;
        self.lock().check()
    }

    /// The broker's links with alias `alias` enslaved to bridge `bridge_index`, as of
    /// the last event applied (see [`LinkRecord::sync`]).
    pub fn ports_of(&self, bridge_index: u32, alias: &str) -> Result<Vec<Link>, RecordError> {
        let state = self.lock();
        state.check()?;
        Ok(state
            .links
            .values()
            .filter(|l| l.controller == Some(bridge_index))
            .filter(|l| l.alias.as_deref() == Some(alias))
            .cloned()
            .collect())
    }

    /// [`LinkRecord::ports_of`] after a [`LinkRecord::sync`].
    pub async fn live_ports_of(
        &self,
        bridge_index: u32,
        alias: &str,
    ) -> Result<Vec<Link>, RecordError> {
        self.sync().await?;
        self.ports_of(bridge_index, alias)
    }

    /// The broker's links with alias `alias` that are not bridges (its TAPs, on the
    /// bridge or not), after a [`LinkRecord::sync`].
    pub async fn live_taps_with_alias(&self, alias: &str) -> Result<Vec<Link>, RecordError> {
        self.sync().await?;
        let state = self.lock();
        state.check()?;
        Ok(state
            .links
            .values()
            .filter(|l| !l.is_bridge && l.alias.as_deref() == Some(alias))
            .cloned()
            .collect())
    }

    /// Fresh dumps taken after the kernel dropped events.
    pub fn resyncs(&self) -> u64 {
        self.lock().resyncs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }
}

fn set_receive_buffer(socket: &rtnetlink::sys::Socket, bytes: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on an open socket, reading one int from a live reference of the
    // length given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Without CAP_NET_ADMIN: as much as net.core.rmem_max allows.
    socket.set_rx_buf_sz(size)
}

/// The task that keeps the record.
struct Keeper {
    state: Arc<Mutex<State>>,
    dumps: Arc<Netlink>,
    /// Requests on the event socket itself: the barriers.
    handle: Handle,
    events: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        SocketAddr,
    )>,
    departed: mpsc::UnboundedSender<Link>,
    silenced: mpsc::UnboundedSender<Link>,
}

/// A TAP of the broker that has no carrier: nobody holds an fd of it any more.
fn is_silent_tap(link: &Link) -> bool {
    is_ours(link) && !link.is_bridge && link.carrier == Some(false)
}

impl Keeper {
    async fn run(mut self, mut barriers: mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
        loop {
            if !self.lock().synced {
                self.resync().await;
            }
            tokio::select! {
                event = self.events.next() => match event {
                    Some((message, _)) => self.handle_event(message),
                    None => break,
                },
                barrier = barriers.recv() => match barrier {
                    Some(first) => {
                        let mut waiting = vec![first];
                        while let Ok(more) = barriers.try_recv() {
                            waiting.push(more);
                        }
                        if !self.barrier().await {
                            break;
                        }
                        for done in waiting {
                            let _ = done.send(());
                        }
                    }
                    // The record was dropped.
                    None => break,
                },
            }
        }
        warn!("link event monitor stopped");
        self.lock().stopped = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    fn handle_event(&mut self, message: NetlinkMessage<RouteNetlinkMessage>) {
        let gone = match message.payload {
            NetlinkPayload::InnerMessage(m) => {
                let applied = self.lock().apply(m);
                // Sent once the lock is released.
                if let Some(link) = applied.silent {
                    let _ = self.silenced.send(link);
                }
                applied.gone
            }
            NetlinkPayload::Overrun(_) => {
                let was_synced = {
                    let mut state = self.lock();
                    let was = std::mem::replace(&mut state.synced, false);
                    if was {
                        state.resyncs += 1;
                    }
                    was
                };
                // Logged once the lock is released: no I/O under it.
                if was_synced {
                    warn!("link events were lost (socket buffer full); resyncing");
                }
                None
            }
            _ => None,
        };
        if let Some(link) = gone {
            debug!(interface = %link.name, "link left");
            let _ = self.departed.send(link);
        }
    }

    /// Takes a dump and replaces the record with it, retrying until it succeeds. Events
    /// keep queueing meanwhile and are applied after it: each carries a link's whole
    /// state, so applying those older than the dump converges all the same.
    async fn resync(&mut self) {
        loop {
            match self.dumps.links().await {
                Ok(links) => {
                    for link in links.iter().filter(|l| is_silent_tap(l)) {
                        let _ = self.silenced.send(link.clone());
                    }
                    let gone = self.lock().replace(links);
                    for link in gone {
                        let _ = self.departed.send(link);
                    }
                    return;
                }
                Err(e) => {
                    warn!("cannot dump links to resync the link record: {e}");
                    tokio::time::sleep(RESYNC_RETRY).await;
                }
            }
        }
    }

    /// Sends a request on the event socket and applies every event that comes before its
    /// answer. Returns false if the connection is gone.
    async fn barrier(&mut self) -> bool {
        let handle = self.handle.clone();
        let answer = async move {
            // Any answer will do, an error included: only its place in the queue counts.
            let mut request = handle.link().get().match_index(1).execute();
            loop {
                match request.try_next().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return true,
                    Err(e) => {
                        warn!("link record barrier failed: {e}");
                        return false;
                    }
                }
            }
        };
        tokio::pin!(answer);
        let deadline = tokio::time::sleep(BARRIER_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                alive = &mut answer => {
                    if !alive {
                        return false;
                    }
                    break;
                }
                event = self.events.next() => match event {
                    Some((message, _)) => {
                        self.handle_event(message);
                        // The answer may have been dropped with the events: do not
                        // wait for it; the caller learns the record is not synced.
                        if !self.lock().synced {
                            return true;
                        }
                    }
                    None => return false,
                },
                _ = &mut deadline => {
                    {
                        let mut state = self.lock();
                        state.synced = false;
                        state.resyncs += 1;
                    }
                    warn!("link record barrier timed out; resyncing");
                    return true;
                }
            }
        }
        // Everything queued before the answer is already in the channel.
        while let Ok((message, _)) = self.events.try_recv() {
            self.handle_event(message);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::{LinkAttribute, LinkMessage};

    fn message(index: u32, name: &str, alias: Option<&str>, family: AddressFamily) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.interface_family = family;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        if let Some(a) = alias {
            m.attributes.push(LinkAttribute::IfAlias(a.into()));
        }
        m.attributes.push(LinkAttribute::Controller(7));
        m
    }

    fn new(index: u32, name: &str, alias: Option<&str>) -> RouteNetlinkMessage {
        RouteNetlinkMessage::NewLink(message(index, name, alias, AddressFamily::Unspec))
    }

    #[test]
    fn only_the_brokers_links_are_kept() {
        let mut s = State {
            synced: true,
            ..State::default()
        };
        assert_eq!(
            s.apply(new(3, "vmnt7-0", Some("vmnet-broker:x"))).gone,
            None
        );
        assert_eq!(s.apply(new(4, "eth0", None)).gone, None);
        assert_eq!(s.apply(new(5, "other", Some("someone:x"))).gone, None);
        assert_eq!(s.links.keys().collect::<Vec<_>>(), [&3]);
        // Its alias taken away: no longer ours, reported as gone.
        let gone = s.apply(new(3, "vmnt7-0", None)).gone.unwrap();
        assert_eq!(gone.name, "vmnt7-0");
        assert!(s.links.is_empty());
    }

    /// A TAP of the broker without carrier is reported closed; one with carrier, a link
    /// of someone else's, or a DELLINK is not.
    #[test]
    fn only_the_brokers_taps_without_carrier_are_reported_closed() {
        let mut s = State {
            synced: true,
            ..State::default()
        };
        let with_carrier = |index, alias: Option<&str>, on| {
            let mut m = message(index, "vmnt7-0", alias, AddressFamily::Unspec);
            m.attributes.push(LinkAttribute::Carrier(on));
            RouteNetlinkMessage::NewLink(m)
        };
        let ours = Some("vmnet-broker:x");
        assert!(s.apply(with_carrier(3, ours, 1)).silent.is_none());
        let closed = s.apply(with_carrier(3, ours, 0)).silent.expect("reported");
        assert_eq!((closed.index, closed.carrier), (3, Some(false)));
        assert!(s.apply(with_carrier(4, None, 0)).silent.is_none());
        let deleted =
            RouteNetlinkMessage::DelLink(message(3, "vmnt7-0", ours, AddressFamily::Unspec));
        assert!(s.apply(deleted).silent.is_none());
    }

    #[test]
    fn bridge_port_messages_do_not_remove_links() {
        let mut s = State {
            synced: true,
            ..State::default()
        };
        s.apply(new(3, "vmnt7-0", Some("vmnet-broker:x")));
        let port_left =
            RouteNetlinkMessage::DelLink(message(3, "vmnt7-0", None, AddressFamily::Bridge));
        assert_eq!(s.apply(port_left).gone, None);
        assert_eq!(s.links.len(), 1);
        let deleted =
            RouteNetlinkMessage::DelLink(message(3, "vmnt7-0", None, AddressFamily::Unspec));
        assert_eq!(s.apply(deleted).gone.unwrap().index, 3);
        assert!(s.links.is_empty());
    }

    #[test]
    fn an_unsynced_record_answers_nothing_and_a_dump_reports_what_left() {
        let mut s = State::default();
        assert!(matches!(s.check(), Err(RecordError::NotSynced)));
        let a = Link::from_message(message(
            3,
            "vmnt7-0",
            Some("vmnet-broker:x"),
            AddressFamily::Unspec,
        ));
        let b = Link::from_message(message(
            4,
            "vmnt7-1",
            Some("vmnet-broker:x"),
            AddressFamily::Unspec,
        ));
        assert!(s.replace(vec![a.clone(), b.clone()]).is_empty());
        assert!(s.check().is_ok());
        s.synced = false;
        let gone = s.replace(vec![b]);
        assert_eq!(gone, [a]);
        assert!(s.check().is_ok());
        s.stopped = true;
        assert!(matches!(s.check(), Err(RecordError::Stopped)));
    }
}
