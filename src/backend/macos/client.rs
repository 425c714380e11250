//! An XPC client of the broker, as the original's C client talks to it: one connection
//! to the Mach service for the life of the client (the connection is the lease),
//! `xpc_connection_send_message_with_reply_sync` per request. Used by the CLI on macOS
//! (`acquire`, `status`) and the macOS tests.

use super::ffi::{self, CfRef, XpcDictionary, XpcObject};
use crate::protocol::{BrokerError, ErrorCode, Status};
use crate::xpc::{
    COMMAND_ACQUIRE, COMMAND_STATUS, Dictionary, KEY_COMMAND, KEY_ERROR, KEY_NETWORK,
    KEY_NETWORK_NAME, KEY_STATUS,
};
use block2::RcBlock;
use ipnet::Ipv4Net;
use std::ffi::CString;

pub struct XpcClient {
    connection: XpcObject,
}

/// What `acquire` got: the serialization, and what it says about the network.
#[derive(Debug)]
pub struct AcquiredNetwork {
    pub serialization: XpcObject,
    pub subnet: Ipv4Net,
    pub ipv6_prefix: String,
}

impl XpcClient {
    /// Opens the connection. XPC connects lazily: a service that does not exist shows as
    /// `XPC_FAILURE` (1) on the first request.
    pub fn connect(service: &str) -> Result<Self, BrokerError> {
        let name = CString::new(service).map_err(|_| {
            BrokerError::new(
                ErrorCode::BrokerUnreachable,
                format!("bad service name {service:?}"),
            )
        })?;
        // SAFETY: a NUL-terminated name, no queue (XPC's default), no flags; +1 owned below.
        let conn =
            unsafe { ffi::xpc_connection_create_mach_service(name.as_ptr(), std::ptr::null(), 0) };
        // SAFETY: NULL or an owned connection.
        let connection = unsafe { XpcObject::from_owned(conn) }.ok_or_else(|| {
            BrokerError::new(
                ErrorCode::BrokerUnreachable,
                format!("cannot connect to {service}"),
            )
        })?;
        // Replies come synchronously; connection errors show up there too.
        let handler = RcBlock::new(|_event: ffi::xpc_object_t| {});
        // SAFETY: a live connection; XPC copies the block; resume once, after the handler.
        unsafe {
            ffi::xpc_connection_set_event_handler(connection.as_ptr(), &handler);
            ffi::xpc_connection_resume(connection.as_ptr());
        }
        Ok(Self { connection })
    }

    fn call(&self, request: &XpcDictionary) -> Result<XpcDictionary, BrokerError> {
        // SAFETY: live connection and message; the reply is +1, owned below.
        let reply = unsafe {
            ffi::xpc_connection_send_message_with_reply_sync(
                self.connection.as_ptr(),
                request.0.as_ptr(),
            )
        };
        // SAFETY: NULL or an owned object.
        let reply = unsafe { XpcObject::from_owned(reply) }
            .ok_or_else(|| BrokerError::new(ErrorCode::InvalidReply, "no reply"))?;
        if reply.type_() != ffi::type_dictionary() {
            return Err(BrokerError::new(
                ErrorCode::BrokerUnreachable,
                "the broker cannot be reached (XPC error)",
            ));
        }
        let reply = XpcDictionary(reply);
        if reply.get_value(KEY_ERROR).is_some() {
            let code = ErrorCode::from_code(reply.get_int64(KEY_ERROR));
            return Err(BrokerError::new(code, code.strerror()));
        }
        Ok(reply)
    }

    /// Acquires a network by name. The lease lasts as long as this client.
    pub fn acquire(&self, name: &str) -> Result<AcquiredNetwork, BrokerError> {
        let mut request = XpcDictionary::new();
        request.set_string(KEY_COMMAND, COMMAND_ACQUIRE);
        request.set_string(KEY_NETWORK_NAME, name);
        let reply = self.call(&request)?;
        let serialization = reply
            .get_value(KEY_NETWORK)
            .ok_or_else(|| BrokerError::new(ErrorCode::InvalidReply, "the reply has no network"))?;
        let (subnet, ipv6_prefix) = describe(&serialization)?;
        Ok(AcquiredNetwork {
            serialization,
            subnet,
            ipv6_prefix,
        })
    }

    /// Our `status` command (an original broker answers it with 4).
    pub fn status(&self) -> Result<Status, BrokerError> {
        let mut request = XpcDictionary::new();
        request.set_string(KEY_COMMAND, COMMAND_STATUS);
        let reply = self.call(&request)?;
        let json = reply
            .get_string(KEY_STATUS)
            .ok_or_else(|| BrokerError::new(ErrorCode::InvalidReply, "the reply has no status"))?;
        serde_json::from_str(&json)
            .map_err(|e| BrokerError::new(ErrorCode::InvalidReply, format!("bad status: {e}")))
    }
}

impl Drop for XpcClient {
    fn drop(&mut self) {
        // SAFETY: a live connection; cancelling ends the lease now rather than when XPC
        // gets to it. The reference is released by `connection`'s drop.
        unsafe { ffi::xpc_connection_cancel(self.connection.as_ptr()) }
    }
}

/// Turns a serialization back into the network, as a VM launcher does, to read its subnet
/// and IPv6 prefix; the network ref is released again.
pub fn describe(serialization: &XpcObject) -> Result<(Ipv4Net, String), BrokerError> {
    let mut status = 0;
    // SAFETY: a live serialization and a u32 vmnet writes; the network is +1 (or NULL).
    let net = unsafe {
        ffi::vmnet_network_create_with_serialization(serialization.as_ptr(), &mut status)
    };
    // SAFETY: NULL or an owned network, released when `net` drops.
    let net = unsafe { CfRef::from_owned(net) };
    let net = match (
        net,
        crate::backend::vmnet::VmnetError::check("vmnet_network_create_with_serialization", status),
    ) {
        (Some(net), Ok(())) => net,
        (_, Err(e)) => return Err(BrokerError::new(ErrorCode::InvalidReply, e.to_string())),
        (None, Ok(())) => {
            return Err(BrokerError::new(
                ErrorCode::InvalidReply,
                "no network from the serialization",
            ));
        }
    };
    Ok(super::addresses(&net))
}
