//! Where the registry's answers become wire messages, for every server (the Unix-socket
//! server of `server`, the XPC server of `backend::macos`): the backend's platform details
//! become the reply's `bridge` and `interface`, registry errors their codes.

use crate::backend;
use crate::config::prefix_to_mask;
use crate::error::chain;
use crate::protocol::{
    BrokerError, ClientStatus, ErrorCode, Mac, NetworkInfo, NetworkStatus, Status,
};
use crate::registry::{Acquired, RegistryError, Snapshot};

/// The reply to an acquire: the network as the client sees it.
pub fn network_info<E>(a: &Acquired<E>) -> NetworkInfo {
    let d = &a.details;
    NetworkInfo {
        name: a.network.clone(),
        mode: a.mode.as_str().to_string(),
        subnet: d.subnet.to_string(),
        gateway: d.gateway.to_string(),
        mask: prefix_to_mask(d.subnet.prefix_len()).to_string(),
        mtu: d.mtu,
        bridge: d
            .platform
            .get(backend::BRIDGE)
            .unwrap_or_default()
            .to_string(),
        interface: a
            .attachment
            .platform
            .get(backend::INTERFACE)
            .unwrap_or(&a.attachment.id.0)
            .to_string(),
        mac: Mac::from(a.mac).to_string(),
    }
}

/// The reply to `status` (not yet cut to the message size).
pub fn status_reply(s: Snapshot) -> Status {
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: crate::protocol::PROTOCOL_VERSION,
        pid: std::process::id(),
        idle_timeout_seconds: s.idle_timeout.as_secs_f64(),
        networks: s
            .networks
            .into_iter()
            .map(|n| NetworkStatus {
                mode: n.mode.as_str().to_string(),
                subnet: n.details.subnet.to_string(),
                gateway: n.details.gateway.to_string(),
                bridge: n
                    .details
                    .platform
                    .get(backend::BRIDGE)
                    .unwrap_or_default()
                    .to_string(),
                mtu: n.details.mtu,
                overlay: n.details.platform.get(backend::OVERLAY).map(str::to_string),
                clients: n.clients,
                taps: n.endpoints.into_iter().map(|e| e.0).collect(),
                removal_in_seconds: n.removal_in.map(|d| d.as_secs_f64()),
                name: n.name,
            })
            .collect(),
        clients: s
            .clients
            .into_iter()
            .map(|c| ClientStatus {
                id: c.id,
                pid: c.peer.pid,
                uid: c.peer.uid,
                gid: c.peer.gid,
                networks: c.networks,
            })
            .collect(),
        truncated: false,
    }
}

/// The wire error for a registry error: its code, and the whole chain on one line.
pub fn wire_error(e: &RegistryError) -> BrokerError {
    let code = match e {
        RegistryError::NotFound(_) | RegistryError::Invalid { .. } => ErrorCode::NotFound,
        RegistryError::NotAllowed(_) => ErrorCode::NotAllowed,
        RegistryError::MacInUse { .. } => ErrorCode::InvalidRequest,
        RegistryError::NotYourEndpoint { .. } | RegistryError::PrivilegedPort { .. } => {
            ErrorCode::NotAllowed
        }
        RegistryError::Forward { source, .. } => match source {
            backend::BackendError::PortInUse(_) => ErrorCode::PortInUse,
            backend::BackendError::Unsupported(_) => ErrorCode::InvalidRequest,
            _ => ErrorCode::CreateFailure,
        },
        RegistryError::TooManyForwards => ErrorCode::InternalError,
        RegistryError::Create { .. } | RegistryError::Attach { .. } => ErrorCode::CreateFailure,
        RegistryError::ShuttingDown
        | RegistryError::UnknownClient
        | RegistryError::TooManyConnections { .. }
        | RegistryError::TooManyNetworks
        | RegistryError::TooManyEndpoints
        | RegistryError::EndpointsUnknown(_)
        | RegistryError::TapLimit(_)
        | RegistryError::TapLimitUnknown { .. }
        | RegistryError::Unreadable { .. }
        | RegistryError::Lookup(_)
        | RegistryError::Task(_) => ErrorCode::InternalError,
    };
    BrokerError::new(code, chain(e))
}
