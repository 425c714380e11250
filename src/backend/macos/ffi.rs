//! Hand-written declarations of the few XPC (libSystem), vmnet and CoreFoundation calls the
//! macOS backend makes, and owning wrappers that release what they hold exactly once.
//!
//! Ownership follows Apple's rules, noted next to each declaration: a function named
//! `*_create*` or `*_copy*` returns an object the caller owns (+1) and must release; a
//! `*_get*` returns one borrowed from its container, valid while the container lives.
//! XPC objects are released with `xpc_release`, vmnet configurations and networks with
//! `CFRelease`.
//!
//! Compiled for the Apple targets only, and never yet run (docs/macos.md): the signatures
//! follow the macOS 26 SDK headers as documented.

#![allow(non_camel_case_types, non_upper_case_globals)]

use block2::Block;
use dispatch2::DispatchQueue;
use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;

pub type xpc_object_t = *mut c_void;
pub type xpc_connection_t = xpc_object_t;
pub type xpc_type_t = *const c_void;
pub type xpc_handler_t = Block<dyn Fn(xpc_object_t)>;
pub type vmnet_return_t = u32;
pub type vmnet_mode_t = u32;
pub type vmnet_network_configuration_ref = *mut c_void;
pub type vmnet_network_ref = *mut c_void;

/// `XPC_CONNECTION_MACH_SERVICE_LISTENER`: the connection listens on the service.
pub const XPC_CONNECTION_MACH_SERVICE_LISTENER: u64 = 1;

// libxpc is part of libSystem, which every program links.
unsafe extern "C" {
    // The type and error objects are globals; their addresses are what
    // `XPC_TYPE_*` and `XPC_ERROR_*` mean.
    pub static _xpc_type_connection: c_void;
    pub static _xpc_type_dictionary: c_void;
    pub static _xpc_type_error: c_void;
    pub static _xpc_error_connection_invalid: c_void;
    pub static _xpc_error_connection_interrupted: c_void;

    /// +1: the caller owns the connection.
    pub fn xpc_connection_create_mach_service(
        name: *const c_char,
        targetq: *const DispatchQueue,
        flags: u64,
    ) -> xpc_connection_t;
    /// Copies the block; the caller keeps its own reference.
    pub fn xpc_connection_set_event_handler(connection: xpc_connection_t, handler: &xpc_handler_t);
    pub fn xpc_connection_set_target_queue(
        connection: xpc_connection_t,
        targetq: *const DispatchQueue,
    );
    pub fn xpc_connection_resume(connection: xpc_connection_t);
    pub fn xpc_connection_cancel(connection: xpc_connection_t);
    pub fn xpc_connection_get_euid(connection: xpc_connection_t) -> libc::uid_t;
    pub fn xpc_connection_get_egid(connection: xpc_connection_t) -> libc::gid_t;
    pub fn xpc_connection_get_pid(connection: xpc_connection_t) -> libc::pid_t;
    /// Retains `message` for as long as it needs it; the caller keeps its reference.
    pub fn xpc_connection_send_message(connection: xpc_connection_t, message: xpc_object_t);
    /// +1: the caller owns the reply (a dictionary, or an error object).
    pub fn xpc_connection_send_message_with_reply_sync(
        connection: xpc_connection_t,
        message: xpc_object_t,
    ) -> xpc_object_t;

    /// Borrowed: the type is a global.
    pub fn xpc_get_type(object: xpc_object_t) -> xpc_type_t;
    /// Returns `object` with one more reference, which the caller owns.
    pub fn xpc_retain(object: xpc_object_t) -> xpc_object_t;
    pub fn xpc_release(object: xpc_object_t);

    /// +1: the caller owns the dictionary.
    pub fn xpc_dictionary_create(
        keys: *const *const c_char,
        values: *const xpc_object_t,
        count: usize,
    ) -> xpc_object_t;
    /// +1, or NULL when `original` did not come with a reply port.
    pub fn xpc_dictionary_create_reply(original: xpc_object_t) -> xpc_object_t;
    /// Borrowed from the dictionary; NULL when missing or not a string.
    pub fn xpc_dictionary_get_string(dictionary: xpc_object_t, key: *const c_char)
    -> *const c_char;
    /// Copies the string.
    pub fn xpc_dictionary_set_string(
        dictionary: xpc_object_t,
        key: *const c_char,
        value: *const c_char,
    );
    /// 0 when missing or not an int64.
    pub fn xpc_dictionary_get_int64(dictionary: xpc_object_t, key: *const c_char) -> i64;
    pub fn xpc_dictionary_set_int64(dictionary: xpc_object_t, key: *const c_char, value: i64);
    /// Borrowed from the dictionary; NULL when missing.
    pub fn xpc_dictionary_get_value(dictionary: xpc_object_t, key: *const c_char) -> xpc_object_t;
    /// The dictionary retains `value`; the caller keeps its reference.
    pub fn xpc_dictionary_set_value(
        dictionary: xpc_object_t,
        key: *const c_char,
        value: xpc_object_t,
    );

    /// While a transaction is open launchd does not stop the process for being idle
    /// (EnableTransactions in the plist).
    pub fn xpc_transaction_begin();
    pub fn xpc_transaction_end();
}

#[link(name = "vmnet", kind = "framework")]
unsafe extern "C" {
    /// +1 (CFRelease), or NULL with `status` set.
    pub fn vmnet_network_configuration_create(
        mode: vmnet_mode_t,
        status: *mut vmnet_return_t,
    ) -> vmnet_network_configuration_ref;
    pub fn vmnet_network_configuration_set_ipv4_subnet(
        configuration: vmnet_network_configuration_ref,
        subnet: *const libc::in_addr,
        mask: *const libc::in_addr,
    ) -> vmnet_return_t;
    pub fn vmnet_network_configuration_set_mtu(
        configuration: vmnet_network_configuration_ref,
        mtu: u32,
    ) -> vmnet_return_t;
    pub fn vmnet_network_configuration_set_ipv6_prefix(
        configuration: vmnet_network_configuration_ref,
        prefix: *const libc::in6_addr,
        prefix_len: u8,
    ) -> vmnet_return_t;
    /// `name` is a NUL-terminated interface name vmnet copies.
    pub fn vmnet_network_configuration_set_external_interface(
        configuration: vmnet_network_configuration_ref,
        name: *const c_char,
    ) -> vmnet_return_t;
    pub fn vmnet_network_configuration_disable_nat44(
        configuration: vmnet_network_configuration_ref,
    );
    pub fn vmnet_network_configuration_disable_nat66(
        configuration: vmnet_network_configuration_ref,
    );
    pub fn vmnet_network_configuration_disable_router_advertisement(
        configuration: vmnet_network_configuration_ref,
    );
    /// The internal port comes before the external one; `internal_address` points at an
    /// `in_addr` for `AF_INET`, an `in6_addr` for `AF_INET6`.
    pub fn vmnet_network_configuration_add_port_forwarding_rule(
        configuration: vmnet_network_configuration_ref,
        protocol: u8,
        family: libc::sa_family_t,
        internal_port: u16,
        external_port: u16,
        internal_address: *const c_void,
    ) -> vmnet_return_t;
    pub fn vmnet_network_configuration_disable_dhcp(configuration: vmnet_network_configuration_ref);
    pub fn vmnet_network_configuration_disable_dns_proxy(
        configuration: vmnet_network_configuration_ref,
    );
    /// `client` is an `ether_addr_t`: six bytes.
    pub fn vmnet_network_configuration_add_dhcp_reservation(
        configuration: vmnet_network_configuration_ref,
        client: *const [u8; 6],
        ipv4_address: *const libc::in_addr,
    ) -> vmnet_return_t;
    /// +1 (CFRelease), or NULL with `status` set. The network keeps what it needs of the
    /// configuration, which the caller still releases.
    pub fn vmnet_network_create(
        configuration: vmnet_network_configuration_ref,
        status: *mut vmnet_return_t,
    ) -> vmnet_network_ref;
    /// +1 (xpc_release), or NULL with `status` set.
    pub fn vmnet_network_copy_serialization(
        network: vmnet_network_ref,
        status: *mut vmnet_return_t,
    ) -> xpc_object_t;
    /// +1 (CFRelease), or NULL with `status` set. The client side of a serialization.
    pub fn vmnet_network_create_with_serialization(
        serialization: xpc_object_t,
        status: *mut vmnet_return_t,
    ) -> vmnet_network_ref;
    pub fn vmnet_network_get_ipv4_subnet(
        network: vmnet_network_ref,
        subnet: *mut libc::in_addr,
        mask: *mut libc::in_addr,
    );
    pub fn vmnet_network_get_ipv6_prefix(
        network: vmnet_network_ref,
        prefix: *mut libc::in6_addr,
        prefix_len: *mut u8,
    );
}

#[link(name = "CoreFoundation", kind = "framework")]
unsafe extern "C" {
    pub fn CFRelease(cf: *const c_void);
}

/// `XPC_TYPE_CONNECTION` and friends: the addresses of the type globals.
pub fn type_connection() -> xpc_type_t {
    (&raw const _xpc_type_connection).cast()
}
pub fn type_dictionary() -> xpc_type_t {
    (&raw const _xpc_type_dictionary).cast()
}
pub fn type_error() -> xpc_type_t {
    (&raw const _xpc_type_error).cast()
}
/// `XPC_ERROR_CONNECTION_INVALID`: the peer is gone (or the service name is unknown).
pub fn error_connection_invalid() -> xpc_object_t {
    (&raw const _xpc_error_connection_invalid).cast_mut().cast()
}
pub fn error_connection_interrupted() -> xpc_object_t {
    (&raw const _xpc_error_connection_interrupted)
        .cast_mut()
        .cast()
}

/// One reference to an XPC object, released on drop.
#[derive(Debug)]
pub struct XpcObject(NonNull<c_void>);

// SAFETY: XPC objects are reference counted with atomic counts and may be retained,
// released and sent from any thread; the broker never mutates a dictionary from two
// threads at once (a reply is filled by the one task that owns it).
unsafe impl Send for XpcObject {}
// SAFETY: shared references only read (get_string, get_type) or pass the object to XPC,
// which is thread-safe for those.
unsafe impl Sync for XpcObject {}

impl XpcObject {
    /// Takes over a reference the caller owns (+1); `None` for NULL.
    ///
    /// # Safety
    /// `object` is NULL or an XPC object of which the caller owns one reference.
    pub unsafe fn from_owned(object: xpc_object_t) -> Option<Self> {
        NonNull::new(object).map(Self)
    }

    /// Takes a reference of its own to a borrowed object (`xpc_retain`).
    ///
    /// # Safety
    /// `object` is a live XPC object (borrowed for the call).
    pub unsafe fn retain(object: NonNull<c_void>) -> Self {
        // SAFETY: the caller guarantees `object` is live; xpc_retain returns it with one
        // more reference, which this wrapper now owns.
        Self(unsafe { NonNull::new_unchecked(xpc_retain(object.as_ptr())) })
    }

    pub fn as_ptr(&self) -> xpc_object_t {
        self.0.as_ptr()
    }

    pub fn type_(&self) -> xpc_type_t {
        // SAFETY: `self` holds a reference, so the object is live.
        unsafe { xpc_get_type(self.as_ptr()) }
    }
}

impl Clone for XpcObject {
    fn clone(&self) -> Self {
        // SAFETY: `self` holds a reference, so the object is live.
        unsafe { Self::retain(self.0) }
    }
}

impl Drop for XpcObject {
    fn drop(&mut self) {
        // SAFETY: this wrapper owns exactly one reference, released once here.
        unsafe { xpc_release(self.0.as_ptr()) }
    }
}

/// An XPC dictionary as the protocol's [`crate::xpc::Dictionary`]: the request, or a reply
/// made with `xpc_dictionary_create_reply`.
pub struct XpcDictionary(pub XpcObject);

impl XpcDictionary {
    /// A new empty dictionary (a client's request).
    pub fn new() -> Self {
        // SAFETY: no keys and no values (count 0); the result is +1 and owned by the wrapper.
        let d = unsafe { xpc_dictionary_create(std::ptr::null(), std::ptr::null(), 0) };
        // SAFETY: `d` is an owned dictionary, or NULL only when out of memory.
        Self(unsafe { XpcObject::from_owned(d) }.expect("xpc_dictionary_create"))
    }

    pub fn get_int64(&self, key: &str) -> i64 {
        let key = c_key(key);
        // SAFETY: the dictionary is live (held by self) and `key` a NUL-terminated string.
        unsafe { xpc_dictionary_get_int64(self.0.as_ptr(), key.as_ptr()) }
    }

    /// The value under `key`, with a reference of our own.
    pub fn get_value(&self, key: &str) -> Option<XpcObject> {
        let key = c_key(key);
        // SAFETY: as above; the result is borrowed from the dictionary (or NULL) and
        // retained before the dictionary can go away.
        let v = unsafe { xpc_dictionary_get_value(self.0.as_ptr(), key.as_ptr()) };
        // SAFETY: `v` is live while the dictionary is, which `self` keeps.
        NonNull::new(v).map(|v| unsafe { XpcObject::retain(v) })
    }
}

impl Default for XpcDictionary {
    fn default() -> Self {
        Self::new()
    }
}

/// Protocol keys are constants without NUL bytes; a key with one names nothing.
fn c_key(key: &str) -> CString {
    CString::new(key).unwrap_or_default()
}

impl crate::xpc::Dictionary for XpcDictionary {
    type Value = XpcObject;

    fn get_string(&self, key: &str) -> Option<String> {
        let key = c_key(key);
        // SAFETY: the dictionary is live and `key` NUL-terminated; the result is NULL or a
        // NUL-terminated string borrowed from the dictionary, copied before it can change.
        let s = unsafe { xpc_dictionary_get_string(self.0.as_ptr(), key.as_ptr()) };
        if s.is_null() {
            return None;
        }
        // SAFETY: non-NULL, NUL-terminated and live (see above).
        Some(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
    }

    fn set_string(&mut self, key: &str, value: &str) {
        let (key, value) = (
            c_key(key),
            CString::new(value.replace('\0', "")).unwrap_or_default(),
        );
        // SAFETY: live dictionary, NUL-terminated key and value, both copied by XPC.
        unsafe { xpc_dictionary_set_string(self.0.as_ptr(), key.as_ptr(), value.as_ptr()) }
    }

    fn set_int64(&mut self, key: &str, value: i64) {
        let key = c_key(key);
        // SAFETY: live dictionary, NUL-terminated key.
        unsafe { xpc_dictionary_set_int64(self.0.as_ptr(), key.as_ptr(), value) }
    }

    fn set_value(&mut self, key: &str, value: &XpcObject) {
        let key = c_key(key);
        // SAFETY: live dictionary and value; the dictionary takes a reference of its own,
        // ours is still released by `value`'s owner.
        unsafe { xpc_dictionary_set_value(self.0.as_ptr(), key.as_ptr(), value.as_ptr()) }
    }
}

/// One reference to a CoreFoundation-managed vmnet object (a configuration or a
/// network), released with `CFRelease` on drop.
#[derive(Debug)]
pub struct CfRef(NonNull<c_void>);

// SAFETY: CoreFoundation reference counts are atomic; the vmnet calls the broker makes on
// a network (copy_serialization, the getters) do not mutate it. To verify on a Mac
// (docs/macos.md checklist).
unsafe impl Send for CfRef {}
// SAFETY: as above.
unsafe impl Sync for CfRef {}

impl CfRef {
    /// Takes over a +1 reference; `None` for NULL.
    ///
    /// # Safety
    /// `object` is NULL or a CF object of which the caller owns one reference.
    pub unsafe fn from_owned(object: *mut c_void) -> Option<Self> {
        NonNull::new(object).map(Self)
    }

    pub fn as_ptr(&self) -> *mut c_void {
        self.0.as_ptr()
    }
}

impl Drop for CfRef {
    fn drop(&mut self) {
        // SAFETY: this wrapper owns exactly one reference, released once here.
        unsafe { CFRelease(self.0.as_ptr()) }
    }
}

/// `struct in_addr` of an address (network byte order).
pub fn in6_addr(ip: std::net::Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: ip.octets(),
    }
}

pub fn in_addr(ip: std::net::Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(ip).to_be(),
    }
}

pub fn ipv4(a: libc::in_addr) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from_be(a.s_addr))
}
