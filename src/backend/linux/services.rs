//! The services a Linux network runs inside the broker process: DHCP, DNS, Router
//! Advertisements, and the glue that turns DHCP leases into DNS names (IPv4 and the
//! guests' SLAAC addresses) and into the firewall's MAC→IP bindings.

use super::firewall::Firewall;
use crate::backend::BackendError;
use crate::config::Mode;
use crate::config::NetworkConfig;
use crate::dhcp::{BindHook, DhcpConfig, DhcpServer, Lease};
use crate::dns::{DnsConfig, DnsServer};
use crate::ra::linux::RaServer;
use crate::ra::{self, Advert};
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

/// The DNS domain of a network's VMs: `<vm>.<network>.vmnet`.
pub fn domain_of(network: &str) -> String {
    format!("{network}.vmnet")
}

pub struct Services {
    dhcp: Option<DhcpServer>,
    dns: Option<DnsServer>,
    ra: Option<RaServer>,
    glue: Option<JoinHandle<()>>,
}

pub struct ServiceParams<'a> {
    pub config: &'a NetworkConfig,
    pub bridge: &'a str,
    pub bridge_index: u32,
    pub bridge_mac: [u8; 6],
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The network's IPv6 /64 (the bridge has its `::1`); `None` without kernel IPv6.
    pub ipv6_prefix: Option<Ipv6Net>,
    pub state_dir: &'a Path,
    pub resolv_conf: &'a Path,
    pub firewall: &'a Firewall,
}

impl Services {
    /// Starts what the network's config asks for. On error, whatever was started is
    /// stopped again before returning.
    pub async fn start(p: ServiceParams<'_>) -> Result<Services, BackendError> {
        let name = &p.config.name;
        let domain = domain_of(name);
        let mut services = Services {
            dhcp: None,
            dns: None,
            ra: None,
            glue: None,
        };
        let gateway6 = p.ipv6_prefix.map(crate::ula::gateway_of);
        let (names_tx, names_rx) = watch::channel(Arc::new(Vec::new()));
        if p.config.dhcp {
            // With anti-spoofing, each lease is bound in the firewall before its ACK goes
            // out, so the guest's first packets from the address are not dropped.
            let hook = (!p.config.allow_spoofing).then(|| bind_hook(name, p.firewall));
            let dhcp = DhcpServer::start_with_hook(dhcp_config(&p), hook)
                .await
                .map_err(|e| BackendError::component("DHCP", e))?;
            let leases = dhcp.leases();
            services.dhcp = Some(dhcp);
            let bind = (!p.config.allow_spoofing).then(|| p.firewall.clone());
            services.glue = Some(tokio::spawn(follow_leases(
                name.clone(),
                p.ipv6_prefix,
                leases,
                names_tx,
                bind,
            )));
        }
        if p.config.dns {
            match DnsServer::start(
                DnsConfig {
                    network: name.clone(),
                    listen: p.gateway,
                    listen6: gateway6,
                    subnet: p.subnet,
                    prefix6: p.ipv6_prefix,
                    domain: domain.clone(),
                    resolv_conf: p.resolv_conf.to_path_buf(),
                },
                names_rx,
            )
            .await
            {
                Ok(dns) => services.dns = Some(dns),
                Err(e) => {
                    services.stop().await;
                    return Err(BackendError::component("DNS", e));
                }
            }
        }
        if let Some(prefix) = p.ipv6_prefix
            && p.config.router_advertisement != Some(false)
        {
            let advert = Advert {
                prefix,
                // Only a network with a way out is a default router.
                router_lifetime: if p.config.mode == Mode::Shared {
                    ra::ROUTER_LIFETIME
                } else {
                    std::time::Duration::ZERO
                },
                prefix_valid: ra::PREFIX_VALID,
                prefix_preferred: ra::PREFIX_PREFERRED,
                mtu: p.config.mtu,
                source_mac: p.bridge_mac,
                dns_server: gateway6.filter(|_| p.config.dns),
                search_domain: p.config.dns.then(|| domain.clone()),
                dns_lifetime: ra::DNS_LIFETIME,
            };
            match RaServer::start(name, p.bridge, p.bridge_index, advert) {
                Ok(ra) => services.ra = Some(ra),
                Err(e) => {
                    services.stop().await;
                    return Err(BackendError::component("router advertisements", e));
                }
            }
        }
        Ok(services)
    }

    /// The DHCP server's active leases as last published (none without DHCP). Reads a
    /// watch channel: no I/O, so callers may hold a lock around it.
    pub fn leases(&self) -> Arc<Vec<Lease>> {
        match &self.dhcp {
            Some(dhcp) => dhcp.leases().borrow().clone(),
            None => Arc::new(Vec::new()),
        }
    }

    /// The DHCP server's leases as it publishes them, to follow (none without DHCP).
    pub fn lease_watch(&self) -> Option<watch::Receiver<Arc<Vec<Lease>>>> {
        self.dhcp.as_ref().map(|d| d.leases())
    }

    pub async fn stop(self) {
        if let Some(ra) = self.ra {
            ra.stop().await;
        }
        if let Some(dns) = self.dns {
            dns.stop().await;
        }
        if let Some(glue) = self.glue {
            glue.abort();
            let _ = glue.await;
        }
        if let Some(dhcp) = self.dhcp {
            dhcp.stop().await;
        }
    }
}

/// What the network's DHCP server serves.
fn dhcp_config(p: &ServiceParams<'_>) -> DhcpConfig {
    let name = &p.config.name;
    DhcpConfig {
        network: name.clone(),
        interface: p.bridge.to_string(),
        subnet: p.subnet,
        gateway: p.gateway,
        range: p.config.dhcp_range,
        reservations: p.config.dhcp_reservations.clone(),
        lease_seconds: p.config.lease_seconds,
        mtu: p.config.mtu,
        dns_server: p.config.dns.then_some(p.gateway),
        domain: p.config.dns.then(|| domain_of(name)),
        lease_file: p.state_dir.join(format!("{name}.leases.json")),
    }
}

/// The (MAC, address) of every lease saved for the network that is still active, as its
/// DHCP server will load them; none without DHCP.
pub fn saved_leases(p: &ServiceParams<'_>) -> Vec<([u8; 6], Ipv4Addr)> {
    if !p.config.dhcp {
        return vec![];
    }
    crate::dhcp::saved_leases(&dhcp_config(p), std::time::SystemTime::now())
        .into_iter()
        .map(|l| (l.mac, l.ip))
        .collect()
}

/// Binds a lease in the firewall for the DHCP server, before it sends the ACK.
fn bind_hook(network: &str, firewall: &Firewall) -> BindHook {
    let (network, firewall) = (network.to_string(), firewall.clone());
    Arc::new(move |mac, ip| {
        let (network, firewall) = (network.clone(), firewall.clone());
        Box::pin(async move {
            if let Err(e) = firewall.bind_ip(&network, mac, ip).await {
                warn!(
                    network,
                    "cannot bind {ip} to its lease: {}",
                    crate::error::Chain(&e)
                );
            }
        })
    })
}

/// Publishes every lease change as DNS names (the lease's IPv4 address and the guest's
/// SLAAC address in `prefix6`, which follows from its MAC) and, with anti-spoofing on,
/// binds each newly leased MAC to its address in the firewall (for leases loaded from the
/// lease file; new ones were bound by [`bind_hook`] already, which makes this a no-op for
/// them).
async fn follow_leases(
    network: String,
    prefix6: Option<Ipv6Net>,
    mut leases: watch::Receiver<Arc<Vec<Lease>>>,
    names: watch::Sender<Arc<Vec<(String, IpAddr)>>>,
    firewall: Option<Firewall>,
) {
    let mut bound: BTreeSet<([u8; 6], Ipv4Addr)> = BTreeSet::new();
    loop {
        let current = leases.borrow_and_update().clone();
        let pairs = current
            .iter()
            .filter_map(|l| l.hostname.clone().map(|h| (h, l)))
            .flat_map(|(h, l)| {
                let v6 =
                    prefix6.map(|p| (h.clone(), IpAddr::V6(crate::ula::eui64_address(p, l.mac))));
                std::iter::once((h, IpAddr::V4(l.ip))).chain(v6)
            })
            .collect();
        names.send_replace(Arc::new(pairs));
        if let Some(fw) = &firewall {
            for l in current.iter() {
                if bound.insert((l.mac, l.ip))
                    && let Err(e) = fw.bind_ip_if_new(&network, l.mac, l.ip).await
                {
                    warn!(
                        network,
                        "cannot bind {} to its lease: {}",
                        l.ip,
                        crate::error::Chain(&e)
                    );
                    bound.remove(&(l.mac, l.ip));
                }
            }
        }
        if leases.changed().await.is_err() {
            return;
        }
    }
}
