//! The macOS backend: networks from the macOS 26 vmnet API, handed to clients as vmnet
//! network serializations over XPC, as the original broker does (docs/macos.md).
//!
//! A network is a `vmnet_network_ref` made by the calls [`super::vmnet::plan`] lists; an
//! endpoint is one `vmnet_network_copy_serialization` of it, which the client turns back
//! into the network (`vmnet_network_create_with_serialization`) and attaches its VM to.
//! The broker is not in the data path and keeps nothing per endpoint: the VM's attachment
//! lives in the VM's process, so [`Backend::live_endpoints`] is always empty.
//!
//! Compiled for both Apple targets in CI, never run here: see docs/macos.md for what a Mac
//! must verify.

pub mod client;
pub mod ffi;
pub mod server;

use super::vmnet::{VmnetCall, VmnetError, plan};
use super::{
    AttachRequest, Attachment, Backend, BackendError, EndpointId, NetworkDetails, PlatformDetails,
};
use crate::config::{NetworkConfig, mask_to_prefix};
use ffi::{CfRef, XpcObject};
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

/// Platform detail: the network's IPv6 prefix (vmnet gives every network one).
pub const IPV6_PREFIX: &str = "ipv6_prefix";

/// vmnet networks need no state of the broker's besides the refs themselves.
#[derive(Debug, Default)]
pub struct MacosBackend;

/// One vmnet network. `destroy` releases the ref; an attach under way keeps its own.
#[derive(Debug)]
pub struct MacNetwork {
    name: String,
    net: Mutex<Option<Arc<CfRef>>>,
    details: NetworkDetails,
}

impl MacNetwork {
    fn net(&self) -> Option<Arc<CfRef>> {
        self.net.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn vmnet_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::component("vmnet", e)
}

/// Makes the calls of a plan; returns the network. Every object made is released on the
/// way out except the network, which the caller then owns.
fn execute(calls: &[VmnetCall]) -> Result<CfRef, BackendError> {
    let mut configuration: Option<CfRef> = None;
    let cfg = |c: &Option<CfRef>| {
        c.as_ref().map(CfRef::as_ptr).ok_or_else(|| {
            vmnet_error(std::io::Error::other(
                "the plan does not start with a configuration",
            ))
        })
    };
    for call in calls {
        match call {
            VmnetCall::ConfigurationCreate { mode } => {
                let mut status = 0;
                // SAFETY: `status` is a live u32 vmnet writes; the result is +1 (or NULL),
                // owned by the CfRef and released when `configuration` drops.
                let made = unsafe { ffi::vmnet_network_configuration_create(*mode, &mut status) };
                // SAFETY: `made` is NULL or an owned configuration (see above).
                configuration = unsafe { CfRef::from_owned(made) };
                VmnetError::check("vmnet_network_configuration_create", status)
                    .map_err(vmnet_error)?;
                if configuration.is_none() {
                    return Err(vmnet_error(VmnetError {
                        call: "vmnet_network_configuration_create",
                        code: status,
                    }));
                }
            }
            VmnetCall::SetIpv4Subnet { subnet, mask } => {
                let (subnet, mask) = (ffi::in_addr(*subnet), ffi::in_addr(*mask));
                // SAFETY: a live configuration (held by `configuration`) and two in_addr
                // values vmnet reads during the call.
                let status = unsafe {
                    ffi::vmnet_network_configuration_set_ipv4_subnet(
                        cfg(&configuration)?,
                        &subnet,
                        &mask,
                    )
                };
                VmnetError::check("vmnet_network_configuration_set_ipv4_subnet", status)
                    .map_err(vmnet_error)?;
            }
            VmnetCall::SetIpv6Prefix { prefix, len } => {
                let prefix = ffi::in6_addr(*prefix);
                // SAFETY: a live configuration and an in6_addr vmnet reads during the call.
                let status = unsafe {
                    ffi::vmnet_network_configuration_set_ipv6_prefix(
                        cfg(&configuration)?,
                        &prefix,
                        *len,
                    )
                };
                VmnetError::check("vmnet_network_configuration_set_ipv6_prefix", status)
                    .map_err(vmnet_error)?;
            }
            VmnetCall::SetExternalInterface(name) => {
                // Validated by the config (no NUL in an interface name); refused if not.
                let name = std::ffi::CString::new(name.as_str()).map_err(vmnet_error)?;
                // SAFETY: a live configuration and a NUL-terminated string that outlives
                // the call (vmnet copies it).
                let status = unsafe {
                    ffi::vmnet_network_configuration_set_external_interface(
                        cfg(&configuration)?,
                        name.as_ptr(),
                    )
                };
                VmnetError::check("vmnet_network_configuration_set_external_interface", status)
                    .map_err(vmnet_error)?;
            }
            VmnetCall::DisableNat44 => {
                // SAFETY: a live configuration.
                unsafe { ffi::vmnet_network_configuration_disable_nat44(cfg(&configuration)?) }
            }
            VmnetCall::DisableNat66 => {
                // SAFETY: a live configuration.
                unsafe { ffi::vmnet_network_configuration_disable_nat66(cfg(&configuration)?) }
            }
            VmnetCall::DisableRouterAdvertisement => {
                // SAFETY: a live configuration.
                unsafe {
                    ffi::vmnet_network_configuration_disable_router_advertisement(cfg(
                        &configuration,
                    )?)
                }
            }
            VmnetCall::AddPortForwardingRule {
                protocol,
                family,
                internal_port,
                external_port,
                internal_address,
            } => {
                let (v4, v6);
                let address: *const std::ffi::c_void = match internal_address {
                    std::net::IpAddr::V4(ip) => {
                        v4 = ffi::in_addr(*ip);
                        (&raw const v4).cast()
                    }
                    std::net::IpAddr::V6(ip) => {
                        v6 = ffi::in6_addr(*ip);
                        (&raw const v6).cast()
                    }
                };
                // SAFETY: a live configuration and an in_addr (AF_INET) or in6_addr
                // (AF_INET6), matching `family`, that lives until after the call.
                let status = unsafe {
                    ffi::vmnet_network_configuration_add_port_forwarding_rule(
                        cfg(&configuration)?,
                        *protocol,
                        *family,
                        *internal_port,
                        *external_port,
                        address,
                    )
                };
                VmnetError::check(
                    "vmnet_network_configuration_add_port_forwarding_rule",
                    status,
                )
                .map_err(vmnet_error)?;
            }
            VmnetCall::SetMtu(mtu) => {
                // SAFETY: a live configuration.
                let status =
                    unsafe { ffi::vmnet_network_configuration_set_mtu(cfg(&configuration)?, *mtu) };
                VmnetError::check("vmnet_network_configuration_set_mtu", status)
                    .map_err(vmnet_error)?;
            }
            VmnetCall::DisableDhcp => {
                // SAFETY: a live configuration.
                unsafe { ffi::vmnet_network_configuration_disable_dhcp(cfg(&configuration)?) }
            }
            VmnetCall::DisableDnsProxy => {
                // SAFETY: a live configuration.
                unsafe { ffi::vmnet_network_configuration_disable_dns_proxy(cfg(&configuration)?) }
            }
            VmnetCall::AddDhcpReservation { mac, ip } => {
                let (mac, ip) = (mac.octets(), ffi::in_addr(*ip));
                // SAFETY: a live configuration, six MAC bytes and an in_addr vmnet reads
                // during the call.
                let status = unsafe {
                    ffi::vmnet_network_configuration_add_dhcp_reservation(
                        cfg(&configuration)?,
                        &mac,
                        &ip,
                    )
                };
                VmnetError::check("vmnet_network_configuration_add_dhcp_reservation", status)
                    .map_err(vmnet_error)?;
            }
            VmnetCall::NetworkCreate => {
                let mut status = 0;
                // SAFETY: a live configuration and a u32 vmnet writes; the result is +1
                // (or NULL), owned by the CfRef returned.
                let made = unsafe { ffi::vmnet_network_create(cfg(&configuration)?, &mut status) };
                // SAFETY: `made` is NULL or an owned network.
                let network = unsafe { CfRef::from_owned(made) };
                VmnetError::check("vmnet_network_create", status).map_err(vmnet_error)?;
                return network.ok_or_else(|| {
                    vmnet_error(VmnetError {
                        call: "vmnet_network_create",
                        code: status,
                    })
                });
            }
        }
    }
    Err(vmnet_error(std::io::Error::other(
        "the plan does not end with vmnet_network_create",
    )))
}

/// The subnet and IPv6 prefix vmnet gave the network (it chooses them when the file
/// does not fix the subnet).
fn addresses(net: &CfRef) -> (Ipv4Net, String) {
    let mut subnet = ffi::in_addr(Ipv4Addr::UNSPECIFIED);
    let mut mask = ffi::in_addr(Ipv4Addr::UNSPECIFIED);
    let mut prefix = libc::in6_addr { s6_addr: [0; 16] };
    let mut prefix_len = 0u8;
    // SAFETY: a live network (held by `net`); vmnet writes the four out-parameters, each
    // a live local of the type the header gives.
    unsafe {
        ffi::vmnet_network_get_ipv4_subnet(net.as_ptr(), &mut subnet, &mut mask);
        ffi::vmnet_network_get_ipv6_prefix(net.as_ptr(), &mut prefix, &mut prefix_len);
    }
    let prefix_len_v4 = mask_to_prefix(ffi::ipv4(mask)).unwrap_or(24);
    let subnet = Ipv4Net::new(ffi::ipv4(subnet), prefix_len_v4)
        .unwrap_or_default()
        .trunc();
    let v6 = std::net::Ipv6Addr::from(prefix.s6_addr);
    (subnet, format!("{v6}/{prefix_len}"))
}

/// A serialization of the network for one client (+1, owned by the XpcObject).
fn copy_serialization(net: &CfRef) -> Result<XpcObject, BackendError> {
    let mut status = 0;
    // SAFETY: a live network and a u32 vmnet writes; the result is +1 or NULL.
    let s = unsafe { ffi::vmnet_network_copy_serialization(net.as_ptr(), &mut status) };
    // SAFETY: `s` is NULL or an owned XPC object.
    let s = unsafe { XpcObject::from_owned(s) };
    VmnetError::check("vmnet_network_copy_serialization", status).map_err(vmnet_error)?;
    s.ok_or_else(|| {
        vmnet_error(VmnetError {
            call: "vmnet_network_copy_serialization",
            code: status,
        })
    })
}

impl Backend for MacosBackend {
    type Network = MacNetwork;
    type Endpoint = XpcObject;

    async fn create(&self, config: &NetworkConfig) -> Result<MacNetwork, BackendError> {
        let calls = plan(config).map_err(vmnet_error)?;
        // vmnet talks to its daemon: off the runtime's threads.
        let net = tokio::task::spawn_blocking(move || execute(&calls))
            .await
            .map_err(vmnet_error)??;
        let (subnet, ipv6) = addresses(&net);
        // vmnet's host address is the subnet's first (the original's `subnet` field).
        let gateway = config
            .gateway
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.network()) + 1));
        tracing::info!(network = config.name, %subnet, ipv6_prefix = ipv6, "vmnet network created");
        Ok(MacNetwork {
            name: config.name.clone(),
            net: Mutex::new(Some(Arc::new(net))),
            details: NetworkDetails {
                subnet,
                gateway,
                // vmnet's prefix is an address; as a /64 network when it reads as one.
                ipv6_prefix: ipv6
                    .parse::<std::net::Ipv6Addr>()
                    .ok()
                    .and_then(|a| Ipv6Net::new(a, 64).ok())
                    .map(|n| n.trunc()),
                mtu: config.mtu,
                platform: PlatformDetails::new().with(IPV6_PREFIX, ipv6),
            },
        })
    }

    fn details(&self, network: &MacNetwork) -> NetworkDetails {
        network.details.clone()
    }

    async fn attach(
        &self,
        network: &MacNetwork,
        request: &AttachRequest,
    ) -> Result<Attachment<XpcObject>, BackendError> {
        let net = network.net().ok_or_else(|| {
            BackendError::Vanished(format!("network {:?} was removed", network.name))
        })?;
        let endpoint = tokio::task::spawn_blocking(move || copy_serialization(&net))
            .await
            .map_err(vmnet_error)??;
        Ok(Attachment {
            id: EndpointId(format!("serialization-{}", request.serial)),
            platform: PlatformDetails::new(),
            endpoint,
            answering: Default::default(),
        })
    }

    async fn release(&self, _: &MacNetwork, _: &EndpointId) -> Result<(), BackendError> {
        // Nothing persists per endpoint (the registry asks only for `persistent`, which
        // the XPC protocol never does).
        Ok(())
    }

    async fn live_endpoints(&self, _: &MacNetwork) -> Result<BTreeSet<EndpointId>, BackendError> {
        Ok(BTreeSet::new())
    }

    async fn destroy(&self, network: &MacNetwork) -> Result<(), BackendError> {
        // Dropping our reference releases the network (CFRelease) once no attach holds it;
        // VMs already attached keep their own, as with the original broker.
        let net = network.net.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(net);
        tracing::info!(network = network.name, "vmnet network released");
        Ok(())
    }

    async fn adopt(
        &self,
        record: &crate::state::NetworkRecord,
    ) -> Result<MacNetwork, BackendError> {
        // vmnet networks end with the process that made them: there is nothing to adopt.
        Err(BackendError::Vanished(format!(
            "vmnet network {} ended with the previous broker",
            record.config.name
        )))
    }

    async fn remove_stale(&self) -> Result<(), BackendError> {
        // vmnet networks end with the process that made them: nothing is left behind.
        Ok(())
    }
}
