//! The C ABI of the vmnet-broker client (capi/include/vmnet-broker.h).
//!
//! Lease model: every successful acquire opens its own broker connection, which the
//! library keeps for the life of the process, so the network stays held as long as the
//! program runs (the original C API's behaviour). `vmnet_broker_release(fd)` ends one
//! lease early: it closes the connection acquired with `fd` and `fd` itself.
//!
//! Linux only for now: on macOS clients use the original C client over XPC, which our
//! broker answers unchanged (docs/macos.md).
#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use vmnet_broker_client::client::Client;
use vmnet_broker_client::protocol::{BrokerError, ErrorCode, NetworkInfo, parse_guest_mac};

/// `vmnet_broker_return_t`: a status code (docs/protocol.md), unknown codes included.
pub type VmnetBrokerReturn = c_int;

pub const VMNET_BROKER_SUCCESS: VmnetBrokerReturn = 0;

/// Sizes of the string fields of `struct vmnet_broker_network_info`, NUL included.
pub const NAME_LEN: usize = 65;
pub const MODE_LEN: usize = 16;
pub const ADDR_LEN: usize = 64;
pub const IFNAME_LEN: usize = 16;
pub const MAC_LEN: usize = 18;

/// `struct vmnet_broker_network_info`; every string is NUL-terminated.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VmnetBrokerNetworkInfo {
    pub name: [c_char; NAME_LEN],
    pub mode: [c_char; MODE_LEN],
    pub subnet: [c_char; ADDR_LEN],
    pub gateway: [c_char; ADDR_LEN],
    pub mask: [c_char; ADDR_LEN],
    pub mtu: u32,
    pub bridge: [c_char; IFNAME_LEN],
    pub interface: [c_char; IFNAME_LEN],
    pub mac: [c_char; MAC_LEN],
}

/// Connections of live leases by the TAP fd returned with them. Leases whose fd number
/// came back from the kernel again (the caller closed the fd without releasing) move to
/// `orphans`: still held until exit, never released by somebody else's fd.
struct Leases {
    by_fd: HashMap<RawFd, Client>,
    orphans: Vec<Client>,
}

static LEASES: Mutex<Option<Leases>> = Mutex::new(None);

fn with_leases<T>(f: impl FnOnce(&mut Leases) -> T) -> T {
    let mut guard = LEASES.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(|| Leases {
        by_fd: HashMap::new(),
        orphans: Vec::new(),
    }))
}

fn copy_str<const N: usize>(
    dst: &mut [c_char; N],
    src: &str,
    field: &str,
) -> Result<(), BrokerError> {
    let bytes = src.as_bytes();
    if bytes.len() >= N || bytes.contains(&0) {
        return Err(BrokerError::new(
            ErrorCode::InvalidReply,
            format!(
                "{field} {src:?} does not fit the C structure ({} bytes)",
                N - 1
            ),
        ));
    }
    for (d, s) in dst.iter_mut().zip(bytes) {
        *d = *s as c_char;
    }
    dst[bytes.len()..].fill(0);
    Ok(())
}

fn to_c(info: &NetworkInfo) -> Result<VmnetBrokerNetworkInfo, BrokerError> {
    // SAFETY: VmnetBrokerNetworkInfo is #[repr(C)] plain old data (char arrays and
    // integers), for which all zeroes is a valid value.
    let mut c: VmnetBrokerNetworkInfo = unsafe { std::mem::zeroed() };
    copy_str(&mut c.name, &info.name, "name")?;
    copy_str(&mut c.mode, &info.mode, "mode")?;
    copy_str(&mut c.subnet, &info.subnet, "subnet")?;
    copy_str(&mut c.gateway, &info.gateway, "gateway")?;
    copy_str(&mut c.mask, &info.mask, "mask")?;
    c.mtu = info.mtu;
    copy_str(&mut c.bridge, &info.bridge, "bridge")?;
    copy_str(&mut c.interface, &info.interface, "interface")?;
    copy_str(&mut c.mac, &info.mac, "mac")?;
    Ok(c)
}

/// A code as a C int; codes beyond int (never sent today) become INTERNAL_ERROR.
fn c_code(code: ErrorCode) -> VmnetBrokerReturn {
    c_int::try_from(code.code()).unwrap_or(ErrorCode::InternalError.code() as c_int)
}

/// # Safety
/// `name` must be NULL or a NUL-terminated string, and `mac` likewise; both must stay valid
/// and unchanged during the call (the contract of the exported acquire functions).
unsafe fn acquire(
    name: *const c_char,
    mac: *const c_char,
) -> Result<(RawFd, VmnetBrokerNetworkInfo), BrokerError> {
    if name.is_null() {
        return Err(BrokerError::invalid("network name is NULL"));
    }
    // SAFETY: `name` is not NULL (checked above) and, by this function's contract, a
    // NUL-terminated string that stays valid and unchanged while `name` is borrowed here.
    let name = unsafe { CStr::from_ptr(name) }
        .to_str()
        .map_err(|_| BrokerError::invalid("network name is not UTF-8"))?;
    let mac = if mac.is_null() {
        None
    } else {
        // SAFETY: `mac` is not NULL (checked above) and, by this function's contract, a
        // NUL-terminated string that stays valid and unchanged during the call.
        let s = unsafe { CStr::from_ptr(mac) }
            .to_str()
            .map_err(|_| BrokerError::invalid("mac is not UTF-8"))?;
        Some(parse_guest_mac(s)?)
    };
    let client = Client::connect_default()?;
    let acquired = client.acquire_with_mac(name, mac)?;
    let info = to_c(&acquired.info)?;
    let fd = acquired.fd.into_raw_fd();
    with_leases(|l| {
        if let Some(stale) = l.by_fd.insert(fd, client) {
            l.orphans.push(stale);
        }
    });
    Ok((fd, info))
}

/// # Safety
/// As [`acquire`] for `name` and `mac`; `info` and `status` must each be NULL or valid for
/// writing one value of their type (the contract of the exported acquire functions).
unsafe fn acquire_c(
    name: *const c_char,
    mac: *const c_char,
    info: *mut VmnetBrokerNetworkInfo,
    status: *mut VmnetBrokerReturn,
) -> c_int {
    // SAFETY: `name` and `mac` are as `acquire` needs them, by this function's contract.
    let result =
        catch_unwind(AssertUnwindSafe(|| unsafe { acquire(name, mac) })).unwrap_or_else(|_| {
            Err(BrokerError::new(
                ErrorCode::InternalError,
                "panic in vmnet-broker client",
            ))
        });
    let (fd, code) = match result {
        Ok((fd, c_info)) => {
            if !info.is_null() {
                // SAFETY: not NULL (checked above), so by this function's contract valid
                // for writing one VmnetBrokerNetworkInfo; `write` does not read or drop the
                // old contents, which may be uninitialized.
                unsafe { info.write(c_info) };
            }
            (fd, VMNET_BROKER_SUCCESS)
        }
        Err(e) => (-1, c_code(e.code)),
    };
    if !status.is_null() {
        // SAFETY: not NULL (checked above), so by this function's contract valid for
        // writing one VmnetBrokerReturn (an int); `write` does not read the old value.
        unsafe { status.write(code) };
    }
    fd
}

/// See vmnet-broker.h.
///
/// # Safety
/// `name` must be a NUL-terminated string; `info` and `status` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vmnet_broker_acquire_network(
    name: *const c_char,
    info: *mut VmnetBrokerNetworkInfo,
    status: *mut VmnetBrokerReturn,
) -> c_int {
    // SAFETY: our caller promises what acquire_c needs (see # Safety above); NULL for
    // `mac` is allowed.
    unsafe { acquire_c(name, std::ptr::null(), info, status) }
}

/// See vmnet-broker.h.
///
/// # Safety
/// `name` and `mac` (unless NULL) must be NUL-terminated strings; `info` and `status`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vmnet_broker_acquire_network_with_mac(
    name: *const c_char,
    mac: *const c_char,
    info: *mut VmnetBrokerNetworkInfo,
    status: *mut VmnetBrokerReturn,
) -> c_int {
    // SAFETY: our caller promises exactly what acquire_c needs (see # Safety above).
    unsafe { acquire_c(name, mac, info, status) }
}

/// See vmnet-broker.h: closes `fd` and the connection it was acquired with.
#[unsafe(no_mangle)]
pub extern "C" fn vmnet_broker_release(fd: c_int) -> c_int {
    match with_leases(|l| l.by_fd.remove(&fd)) {
        Some(client) => {
            // SAFETY: `fd` was in the lease table, so an acquire returned it and it has not
            // been released since (removing it from the table above makes this the only
            // release); by the header's contract the caller still owns it and hands it back
            // here, so nothing else closes or uses it after we take ownership.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            drop(client);
            0
        }
        None => {
            // SAFETY: __errno_location() returns a valid, aligned pointer to this thread's
            // errno, which only this thread reads or writes.
            unsafe { *libc::__errno_location() = libc::EBADF };
            -1
        }
    }
}

/// See vmnet-broker.h: the original library's strings, "(unknown status)" otherwise.
#[unsafe(no_mangle)]
pub extern "C" fn vmnet_broker_strerror(status: VmnetBrokerReturn) -> *const c_char {
    let s: &'static CStr = match status {
        0 => c"Success",
        1 => c"Failed to communicate with the broker",
        2 => c"Invalid reply from the broker",
        3 => c"You are not allowed to create a network",
        4 => c"Invalid broker request",
        5 => c"Network name not found",
        6 => c"Failed to create network",
        7 => c"Internal or unknown error",
        8 => c"Port already in use",
        _ => c"(unknown status)",
    };
    s.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_is_the_protocol_table() {
        for code in -2..12 {
            // SAFETY: vmnet_broker_strerror returns a pointer to a `'static` C string
            // literal: valid, NUL-terminated and never mutated.
            let s = unsafe { CStr::from_ptr(vmnet_broker_strerror(code)) };
            assert_eq!(
                s.to_str().unwrap(),
                vmnet_broker_client::protocol::strerror(code.into())
            );
        }
    }

    #[test]
    fn fields_that_do_not_fit_are_invalid_replies() {
        let mut info = NetworkInfo {
            name: "shared".into(),
            mode: "shared".into(),
            subnet: "192.168.64.0/24".into(),
            gateway: "192.168.64.1".into(),
            mask: "255.255.255.0".into(),
            mtu: 1500,
            bridge: "vmnb-shared".into(),
            interface: "vmnt-shared-0".into(),
            mac: "52:54:00:00:00:01".into(),
        };
        let c = to_c(&info).unwrap();
        assert_eq!(
            // SAFETY: to_c() succeeded, so copy_str() left `interface` NUL-terminated
            // within its length; `c` outlives the borrow.
            unsafe { CStr::from_ptr(c.interface.as_ptr()) },
            c"vmnt-shared-0"
        );
        assert_eq!(c.mtu, 1500);
        info.interface = "x".repeat(IFNAME_LEN);
        assert_eq!(to_c(&info).unwrap_err().code, ErrorCode::InvalidReply);
    }

    #[test]
    fn release_of_an_unknown_fd_fails() {
        assert_eq!(vmnet_broker_release(987_654), -1);
    }
}
