//! The XPC server: the original broker's Mach service, answering its clients unchanged
//! (the protocol is `crate::xpc`; this file only moves messages).
//!
//! XPC calls our handlers on one serial dispatch queue. They do no work there: each peer
//! has a channel to a tokio task of its own that registers it with the registry (its
//! identity from `xpc_connection_get_euid/egid/pid`, for the same policy as on Linux),
//! answers its requests in order and releases its networks when XPC reports
//! `XPC_ERROR_CONNECTION_INVALID` (the peer closed or died).
//!
//! Lifecycle as on Linux and in the original: an XPC transaction is open while any peer is
//! connected, so launchd does not stop the broker under running VMs; SIGTERM/SIGINT are
//! ignored while peers hold networks; with no peer for `exit_on_idle` the broker removes
//! its networks and exits, and launchd starts it again on the next lookup.

use super::MacosBackend;
use super::ffi::{self, XpcDictionary, XpcObject};
use crate::registry::Registry;
use crate::xpc::{Answer, answer, parse_request, write_reply};
use crate::{answers::wire_error, policy::Peer};
use block2::RcBlock;
use dispatch2::DispatchQueue;
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

pub struct XpcServerOptions {
    /// The Mach service (launchd's plist must name the same).
    pub service: String,
    /// Exit after no peer has been connected for this long.
    pub exit_on_idle: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum XpcServeError {
    #[error("invalid Mach service name {0:?}")]
    ServiceName(String),
    #[error("cannot listen on Mach service {0:?} (is it in launchd's plist?)")]
    Listen(String),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
}

/// What XPC tells a peer's task.
enum PeerEvent {
    Request(XpcObject),
    Gone,
}

/// Connected peers, for the transaction and the idle exit.
struct Peers {
    live: AtomicUsize,
    changed: Notify,
}

impl Peers {
    fn arrived(&self) {
        if self.live.fetch_add(1, Ordering::SeqCst) == 0 {
            // SAFETY: no arguments; pairs with the end in `left`.
            unsafe { ffi::xpc_transaction_begin() }
        }
        self.changed.notify_waiters();
    }

    fn left(&self) {
        if self.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            // SAFETY: no arguments; ends the transaction `arrived` began for the first peer.
            unsafe { ffi::xpc_transaction_end() }
        }
        self.changed.notify_waiters();
    }
}

/// Serves until a signal arrives while no peer holds a network, or the idle exit fires.
pub async fn serve(
    registry: Arc<Registry<MacosBackend>>,
    options: XpcServerOptions,
) -> Result<(), XpcServeError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(XpcServeError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(XpcServeError::Signals)?;
    let name = CString::new(options.service.clone())
        .map_err(|_| XpcServeError::ServiceName(options.service.clone()))?;
    let queue = DispatchQueue::new("com.github.nirs.vmnet-broker.xpc", None);
    // SAFETY: a NUL-terminated name and a live queue (kept by `queue` until the end of
    // this function, after the cancel); the listener is +1, owned by the XpcObject.
    let listener = unsafe {
        ffi::xpc_connection_create_mach_service(
            name.as_ptr(),
            &*queue,
            ffi::XPC_CONNECTION_MACH_SERVICE_LISTENER,
        )
    };
    // SAFETY: NULL or an owned connection.
    let listener = unsafe { XpcObject::from_owned(listener) }
        .ok_or_else(|| XpcServeError::Listen(options.service.clone()))?;
    let peers = Arc::new(Peers {
        live: AtomicUsize::new(0),
        changed: Notify::new(),
    });
    let runtime = tokio::runtime::Handle::current();
    let handler = {
        let (registry, peers, queue) = (Arc::clone(&registry), Arc::clone(&peers), queue.clone());
        RcBlock::new(move |event: ffi::xpc_object_t| {
            let Some(event) = NonNull::new(event) else {
                return;
            };
            // SAFETY: XPC passes a live object for the duration of the call; we retain it.
            let event = unsafe { XpcObject::retain(event) };
            if event.type_() != ffi::type_connection() {
                // Errors of the listener itself: the service is going away.
                warn!("XPC listener event that is not a connection");
                return;
            }
            accept(&runtime, &registry, &peers, &queue, event);
        })
    };
    // SAFETY: a live listener; XPC copies the block (our RcBlock may drop afterwards).
    unsafe {
        ffi::xpc_connection_set_event_handler(listener.as_ptr(), &handler);
        ffi::xpc_connection_resume(listener.as_ptr());
    }
    info!(
        service = options.service,
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "broker serving"
    );
    loop {
        let idle = idle_exit(&peers, options.exit_on_idle);
        tokio::select! {
            _ = sigterm.recv() => if stop_requested(&registry, "SIGTERM").await { break },
            _ = sigint.recv() => if stop_requested(&registry, "SIGINT").await { break },
            _ = idle => {
                if registry.shutdown_if_idle().await {
                    info!("no peer for the idle-exit period: exiting");
                    break;
                }
            }
        }
    }
    // SAFETY: a live listener; after the cancel XPC sends no new connections.
    unsafe { ffi::xpc_connection_cancel(listener.as_ptr()) };
    drop(handler);
    info!("broker stopped");
    Ok(())
}

/// A new peer connection (on the XPC queue): its handler feeds a task of its own.
fn accept(
    runtime: &tokio::runtime::Handle,
    registry: &Arc<Registry<MacosBackend>>,
    peers: &Arc<Peers>,
    queue: &dispatch2::DispatchRetained<DispatchQueue>,
    connection: XpcObject,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = RcBlock::new(move |event: ffi::xpc_object_t| {
        let Some(event) = NonNull::new(event) else {
            return;
        };
        // SAFETY: live for the call; retained so the task can use it later.
        let event = unsafe { XpcObject::retain(event) };
        if event.type_() == ffi::type_dictionary() {
            let _ = tx.send(PeerEvent::Request(event));
        } else if event.as_ptr() == ffi::error_connection_invalid() {
            let _ = tx.send(PeerEvent::Gone);
        } else {
            // XPC_ERROR_TERMINATION_IMMINENT and the like: the connection goes on.
            debug!("XPC peer event that is neither a request nor the end");
        }
    });
    let conn = connection.as_ptr();
    // SAFETY: a live connection (held by `connection`); the block is copied by XPC; the
    // queue is live (held by `serve`) and serial, so one peer's events come in order.
    unsafe {
        ffi::xpc_connection_set_target_queue(conn, &**queue);
        ffi::xpc_connection_set_event_handler(conn, &handler);
    }
    // SAFETY: a live peer connection; the credentials are those of the process that
    // connected, as the kernel recorded them (audit token).
    let peer = unsafe {
        Peer {
            pid: ffi::xpc_connection_get_pid(conn),
            uid: ffi::xpc_connection_get_euid(conn),
            gid: ffi::xpc_connection_get_egid(conn),
            // The user database gives the groups on macOS (policy::SystemDirectory).
            groups: None,
        }
    };
    peers.arrived();
    let (registry, peers) = (Arc::clone(registry), Arc::clone(peers));
    runtime.spawn(async move {
        serve_peer(&registry, &connection, peer, rx).await;
        peers.left();
        // Our reference to the peer connection drops here, after its last reply.
        drop(connection);
    });
    // SAFETY: a live connection whose handler is set.
    unsafe { ffi::xpc_connection_resume(conn) };
}

async fn serve_peer(
    registry: &Arc<Registry<MacosBackend>>,
    connection: &XpcObject,
    peer: Peer,
    mut rx: mpsc::UnboundedReceiver<PeerEvent>,
) {
    let client = registry.connect(peer.clone()).await;
    while let Some(PeerEvent::Request(request)) = rx.recv().await {
        let request = XpcDictionary(request);
        let result = match &client {
            Ok(client) => answer(registry, *client, parse_request(&request)).await,
            // Refused at connect (too many connections of this uid): every request is
            // answered with why.
            Err(e) => Answer::Error(wire_error(e)),
        };
        reply(connection, &request, &result);
    }
    if let Ok(client) = client {
        registry.disconnect(client).await;
    }
}

/// Sends the reply to `request` on the peer's connection.
fn reply(connection: &XpcObject, request: &XpcDictionary, result: &Answer<XpcObject>) {
    // SAFETY: a live request; the reply is +1 (or NULL for a message sent without
    // waiting for a reply), owned by the XpcObject.
    let made = unsafe { ffi::xpc_dictionary_create_reply(request.0.as_ptr()) };
    // SAFETY: NULL or an owned dictionary.
    let Some(made) = (unsafe { XpcObject::from_owned(made) }) else {
        debug!("request without a reply port: nothing to answer");
        return;
    };
    let mut dict = XpcDictionary(made);
    write_reply(result, &mut dict);
    // SAFETY: a live connection and reply; XPC retains the message while sending it.
    unsafe { ffi::xpc_connection_send_message(connection.as_ptr(), dict.0.as_ptr()) };
}

async fn stop_requested(registry: &Registry<MacosBackend>, signal: &str) -> bool {
    if registry.shutdown_if_idle().await {
        info!("{signal}: no peers, networks removed, exiting");
        true
    } else {
        let n = registry.holders().await;
        warn!(
            "{signal} ignored: {n} peer(s) hold networks; stopping would pull networks from under running VMs"
        );
        false
    }
}

/// Waits until no peer has been connected for `period`; never resolves without one.
async fn idle_exit(peers: &Peers, period: Option<Duration>) {
    let Some(period) = period else {
        return std::future::pending().await;
    };
    loop {
        let changed = peers.changed.notified();
        if peers.live.load(Ordering::SeqCst) == 0 {
            if tokio::time::timeout(period, changed).await.is_err() {
                return;
            }
        } else {
            changed.await;
        }
    }
}
