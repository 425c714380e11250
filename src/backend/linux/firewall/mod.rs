//! The broker's nftables layer: NAT and forwarding for shared networks, forwarding isolation
//! for host networks, MAC/IP anti-spoofing on bridge ports, and recovery after someone
//! flushes the ruleset.
//!
//! Everything lives in two broker-owned tables, `inet vmnet_broker` (forward + NAT) and
//! `bridge vmnet_broker` (anti-spoofing), so that we never edit anybody else's rules, with
//! one documented exception: Docker's `DOCKER-USER` chain (see [`Firewall::add_network`]).
//! Each network gets its own *base* chains (one per hook) and its own sets, so adding and
//! removing a network is a matter of adding and deleting named objects; no rule handles
//! have to be tracked. Several base chains on one hook are evaluated one after the other;
//! an `accept` in one of them lets the packet continue to the next, a `drop` is final.
//!
//! The desired state (networks, ports, IP bindings) is kept in memory, which is what lets
//! the watchdog re-create everything after `nft flush ruleset` (firewalld reloads,
//! `systemctl restart nftables`, ...), a well known cause of VMs silently losing their
//! network with other tools.
//!
//! `nft` is driven with JSON through the `nftables` crate (as netavark does). `nft` runs as
//! a child process, so it acts in the network namespace of the thread that spawns it.

mod rules;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::MetaKey;
use nftables::helper::{self, NftablesError};
use nftables::schema::{NfCmd, NfListObject, NfObject, Rule};
use nftables::stmt::Operator;
use nftables::types::{NfChainPolicy, NfFamily, NfHook};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

pub use rules::ruleset_for;
use rules::*;

/// Name of both broker-owned tables (one `inet`, one `bridge`).
pub const TABLE: &str = "vmnet_broker";
/// Prefix of the comment tagging the rules we insert into Docker's `DOCKER-USER` chain;
/// the network name follows.
pub const DOCKER_COMMENT_PREFIX: &str = "vmnet-broker:";
/// How often the watchdog checks that our tables still exist.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(2);

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What the firewall needs to know about one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallNetwork {
    pub name: String,
    /// Kernel bridge device of the network.
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Mode shared: masquerade and forward to the outside. Mode host: no forwarding at all.
    pub nat: bool,
    /// `!allow_spoofing`: bind each TAP to its guest's MAC (and IPv4 lease, see `dhcp`).
    pub anti_spoofing: bool,
    /// The broker runs DHCP on this network: IPv4 sources are bound to the lease given by
    /// [`Firewall::bind_ip`], and only `0.0.0.0` is allowed before it. Without DHCP guests
    /// use static addresses and only their MAC is enforced.
    pub dhcp: bool,
    /// Every TAP the broker makes for this network has a name starting with this. With
    /// anti-spoofing, frames from such a TAP are dropped until [`Firewall::add_port`] has
    /// bound it: a TAP is protected from the moment it exists, so binding it need not
    /// delay the acquire. Ports without the prefix (uplinks, other software's) are left
    /// alone.
    pub tap_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("nft not found: install nftables (needed for NAT and anti-spoofing)")]
    NftNotFound,
    #[error("cannot list the network's TAPs: {0}")]
    ListTaps(std::io::Error),
    #[error("could not run nft while {context}: {source}")]
    NftSpawn {
        context: String,
        source: std::io::Error,
    },
    #[error("nft failed while {context}: {stderr}")]
    Nft { context: String, stderr: String },
    #[error("could not understand nft output while {context}: {detail}")]
    NftOutput { context: String, detail: String },
    #[error("firewall: unknown network {0:?}")]
    UnknownNetwork(String),
    #[error("firewall: invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("could not enable IPv4 forwarding ({IP_FORWARD}): {0}")]
    IpForward(std::io::Error),
}

fn nft_error(context: &str, e: NftablesError) -> FirewallError {
    match e {
        NftablesError::NftExecution { inner, .. }
            if inner.kind() == std::io::ErrorKind::NotFound =>
        {
            FirewallError::NftNotFound
        }
        NftablesError::NftExecution { inner, .. } => FirewallError::NftSpawn {
            context: context.into(),
            source: inner,
        },
        NftablesError::NftFailed { stderr, .. } => FirewallError::Nft {
            context: context.into(),
            stderr: stderr.trim().to_string(),
        },
        other => FirewallError::NftOutput {
            context: context.into(),
            detail: other.to_string(),
        },
    }
}

#[derive(Debug)]
pub(super) struct NetState {
    net: FirewallNetwork,
    /// TAP name -> guest MAC.
    ports: BTreeMap<String, [u8; 6]>,
    /// Guest MAC -> leased IPv4 address.
    leases: BTreeMap<[u8; 6], Ipv4Addr>,
}

#[derive(Debug, Default)]
struct State {
    networks: BTreeMap<String, NetState>,
}

struct Inner {
    nft: OsString,
    // A tokio mutex: it is held across `nft` runs so that the watchdog's restore and the
    // API calls never interleave their transactions.
    state: Mutex<State>,
}

/// The broker's firewall. One per broker process; cheap to clone (all clones share state).
#[derive(Clone)]
pub struct Firewall {
    inner: Arc<Inner>,
}

impl Default for Firewall {
    fn default() -> Self {
        Self::new()
    }
}

impl Firewall {
    /// A firewall with no networks, using `nft` from `PATH`. Nothing touches the kernel
    /// until the first [`Firewall::add_network`].
    pub fn new() -> Firewall {
        Self::with_nft_program("nft")
    }

    /// Same as [`Firewall::new`] with another `nft` executable.
    pub fn with_nft_program(program: impl Into<OsString>) -> Firewall {
        Firewall {
            inner: Arc::new(Inner {
                nft: program.into(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Sets up forwarding/NAT (and anti-spoofing when asked) for a network. Adding the same
    /// definition again does nothing; a different definition under the same name replaces
    /// the old one (a network re-created on a new bridge has a new TAP prefix), keeping only
    /// the port bindings and leases that still fit the new definition.
    ///
    /// For NAT networks IPv4 forwarding is switched on in this network namespace and left
    /// on when the broker stops: other software (container engines, VPNs) may rely on it,
    /// and switching it off behind their back would break them.
    ///
    /// Docker sets the policy of `ip filter FORWARD` to drop, and an accept in our table
    /// cannot override a drop in another table. When that policy is found and Docker's
    /// `DOCKER-USER` chain exists, accept rules for our bridge are inserted there (tagged
    /// `vmnet-broker:<network>`, removed with the network); otherwise a warning explains
    /// the fix. This is checked when the network is added (and after a restore).
    pub async fn add_network(&self, net: &FirewallNetwork) -> Result<(), FirewallError> {
        validate_network(net)?;
        let mut state = self.inner.state.lock().await;
        let mut ports = BTreeMap::new();
        let mut leases = BTreeMap::new();
        if let Some(existing) = state.networks.get(&net.name) {
            if existing.net == *net {
                return Ok(());
            }
            info!(network = %net.name, old_bridge = %existing.net.bridge, new_bridge = %net.bridge,
                  "firewall: replacing the rules of a network with a new definition");
            // Bindings of TAPs of the old bridge are meaningless on the new one.
            ports = existing
                .ports
                .iter()
                .filter(|(tap, _)| tap.starts_with(&net.tap_prefix))
                .map(|(tap, mac)| (tap.clone(), *mac))
                .collect();
            leases = existing
                .leases
                .iter()
                .filter(|(_, ip)| net.subnet.contains(*ip))
                .map(|(mac, ip)| (*mac, *ip))
                .collect();
        }
        if let Some(other) = state
            .networks
            .values()
            .find(|n| n.net.bridge == net.bridge && n.net.name != net.name)
        {
            return Err(FirewallError::Invalid {
                what: "network",
                detail: format!(
                    "bridge {:?} of network {:?} is already used by network {:?}",
                    net.bridge, net.name, other.net.name
                ),
            });
        }
        let ns = NetState {
            net: net.clone(),
            ports,
            leases,
        };
        let mut batch = Batch::new();
        add_tables(&mut batch);
        // Whatever objects of this name exist go first: the old definition's, or those a
        // failed removal left behind (it forgets the network anyway, see `remove_network`).
        purge_network_objects(&mut batch, &net.name);
        network_objects(&mut batch, &ns);
        let context = format!("adding network {:?}", net.name);
        self.inner
            .apply_or_restore(&mut state, batch, &context, |s| {
                s.networks.insert(ns.net.name.clone(), ns);
            })
            .await?;
        if net.nat {
            if let Err(e) = enable_ip_forward() {
                // Leave no half-configured network behind.
                let _ = self.remove_locked(&mut state, &net.name).await;
                return Err(e);
            }
            self.inner.docker_sync(net).await;
        }
        info!(network = %net.name, bridge = %net.bridge, nat = net.nat,
              anti_spoofing = net.anti_spoofing, "firewall rules added");
        Ok(())
    }

    /// Deletes tables a broker that died without cleaning up left behind. Called before the
    /// first network is added; with networks present it does nothing.
    pub async fn remove_stale(&self) -> Result<(), FirewallError> {
        let state = self.inner.state.lock().await;
        if !state.networks.is_empty() || !self.inner.any_table_present().await? {
            return Ok(());
        }
        let mut batch = Batch::new();
        delete_tables(&mut batch);
        self.inner.apply(batch, "removing stale tables").await?;
        info!("removed stale firewall tables");
        Ok(())
    }

    /// Removes everything the network added. Removing the last network deletes both tables.
    /// Removing an unknown network is not an error (cleanup paths may call it twice).
    ///
    /// The network is forgotten even when `nft` fails (the error is still returned): the
    /// caller goes on to delete the bridge, so keeping it would make the watchdog restore
    /// rules for a dead bridge. What the failure left in the kernel is deleted by the next
    /// `add_network` of the same name, by a restore, or with the tables.
    pub async fn remove_network(&self, name: &str) -> Result<(), FirewallError> {
        let mut state = self.inner.state.lock().await;
        self.remove_locked(&mut state, name).await
    }

    async fn remove_locked(&self, state: &mut State, name: &str) -> Result<(), FirewallError> {
        let Some(ns) = state.networks.get(name) else {
            debug!(
                network = name,
                "firewall: remove of unknown network ignored"
            );
            return Ok(());
        };
        let net = ns.net.clone();
        let mut batch = Batch::new();
        if state.networks.len() == 1 {
            delete_tables(&mut batch);
        } else {
            delete_network_objects(&mut batch, &net);
        }
        let context = format!("removing network {name:?}");
        let applied = self
            .inner
            .apply_or_restore(state, batch, &context, |s| {
                s.networks.remove(&net.name);
            })
            .await;
        // The commit above only runs on success (or before a restore).
        state.networks.remove(&net.name);
        let docker = if net.nat {
            self.inner.docker_remove(&net.name).await
        } else {
            Ok(())
        };
        if let Err(e) = applied {
            warn!(
                network = name,
                "firewall: network forgotten, but its rules may remain: {e}"
            );
            return Err(e);
        }
        docker?;
        info!(network = name, "firewall rules removed");
        Ok(())
    }

    /// Forgets the bindings of TAPs of `network` that are not among the `live` ones (their
    /// VMs closed them), so a long-lived network does not accumulate set elements. Runs no
    /// `nft` when there is nothing to forget. Returns how many TAPs are live.
    ///
    /// `live` lists the TAPs that exist; it is awaited under the firewall's lock, so every
    /// binding already recorded belongs to a TAP that existed before the listing, and one
    /// missing from it is really gone (a TAP made meanwhile is never pruned).
    pub async fn prune_ports(
        &self,
        network: &str,
        live: impl Future<Output = std::io::Result<Vec<String>>>,
    ) -> Result<usize, FirewallError> {
        let mut state = self.inner.state.lock().await;
        let Some(ns) = state.networks.get(network) else {
            return Ok(0);
        };
        let live = live.await.map_err(FirewallError::ListTaps)?;
        let live_count = live.len();
        let gone: Vec<(String, [u8; 6])> = ns
            .ports
            .iter()
            .filter(|(tap, _)| !live.contains(tap))
            .map(|(tap, mac)| (tap.clone(), *mac))
            .collect();
        if gone.is_empty() {
            return Ok(live_count);
        }
        let mut batch = Batch::new();
        if ns.net.anti_spoofing {
            for (tap, mac) in &gone {
                port_elements(&mut batch, NfCmd::Delete, network, tap, *mac);
            }
        }
        let context = format!(
            "forgetting {} closed TAP(s) of network {network:?}",
            gone.len()
        );
        let network = network.to_string();
        self.inner
            .apply_or_restore(&mut state, batch, &context, |s| {
                if let Some(ns) = s.networks.get_mut(&network) {
                    for (tap, _) in &gone {
                        ns.ports.remove(tap);
                    }
                }
            })
            .await
            .map(|()| live_count)
    }

    /// Binds a TAP (bridge port) to the MAC of its guest: frames entering from `tap` must
    /// carry `mac` as Ethernet (and ARP sender) source. A TAP name that is reused replaces
    /// its previous binding, in whatever network it was. Without anti-spoofing on the
    /// network this only records the port.
    pub async fn add_port(
        &self,
        network: &str,
        tap: &str,
        mac: [u8; 6],
    ) -> Result<(), FirewallError> {
        self.add_ports(network, &[(tap.to_string(), mac)]).await
    }

    /// [`Firewall::add_port`] for several TAPs of one network in one `nft` transaction:
    /// a burst of acquires costs one `nft` run instead of one each.
    pub async fn add_ports(
        &self,
        network: &str,
        ports: &[(String, [u8; 6])],
    ) -> Result<(), FirewallError> {
        for (tap, _) in ports {
            validate_ifname(tap)?;
        }
        let mut state = self.inner.state.lock().await;
        if !state.networks.contains_key(network) {
            return Err(FirewallError::UnknownNetwork(network.into()));
        }
        let mut batch = Batch::new();
        let mut new = Vec::with_capacity(ports.len());
        for (tap, mac) in ports {
            let mut bound = false;
            for ns in state.networks.values() {
                if let Some(old) = ns.ports.get(tap) {
                    if ns.net.name == network && old == mac {
                        bound = true;
                    } else if ns.net.anti_spoofing {
                        port_elements(&mut batch, NfCmd::Delete, &ns.net.name, tap, *old);
                    }
                }
            }
            if !bound {
                new.push((tap.clone(), *mac));
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        if state.networks[network].net.anti_spoofing {
            for (tap, mac) in &new {
                port_elements(&mut batch, NfCmd::Add, network, tap, *mac);
            }
        }
        let context = match new.as_slice() {
            [(tap, mac)] => format!(
                "binding port {tap:?} of network {network:?} to {}",
                mac_str(*mac)
            ),
            many => format!("binding {} ports of network {network:?}", many.len()),
        };
        let network = network.to_string();
        self.inner
            .apply_or_restore(&mut state, batch, &context, |s| {
                for (tap, mac) in new {
                    for ns in s.networks.values_mut() {
                        ns.ports.remove(&tap);
                    }
                    if let Some(ns) = s.networks.get_mut(&network) {
                        ns.ports.insert(tap, mac);
                    }
                }
            })
            .await
    }

    /// Records the DHCP lease of a guest: from now on IPv4 packets and ARP from `mac` must
    /// use `ip` as source. A new lease for the MAC replaces the old one, and an address
    /// moved to another MAC is taken away from the previous one. It has an effect on the
    /// packets only on networks with anti-spoofing and DHCP.
    pub async fn bind_ip(
        &self,
        network: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
    ) -> Result<(), FirewallError> {
        let mut state = self.inner.state.lock().await;
        let Some(ns) = state.networks.get(network) else {
            return Err(FirewallError::UnknownNetwork(network.into()));
        };
        if !ns.net.subnet.contains(&ip) {
            return Err(FirewallError::Invalid {
                what: "IP binding",
                detail: format!("{ip} is outside {} of network {network:?}", ns.net.subnet),
            });
        }
        if ns.leases.get(&mac) == Some(&ip) {
            return Ok(());
        }
        let stale: Vec<([u8; 6], Ipv4Addr)> = ns
            .leases
            .iter()
            .filter(|(m, i)| **m == mac || **i == ip)
            .map(|(m, i)| (*m, *i))
            .collect();
        let mut batch = Batch::new();
        if ns.net.anti_spoofing && ns.net.dhcp {
            for (m, i) in &stale {
                lease_element(&mut batch, NfCmd::Delete, network, *m, *i);
            }
            lease_element(&mut batch, NfCmd::Add, network, mac, ip);
        }
        let context = format!("binding {} to {ip} on network {network:?}", mac_str(mac));
        let network = network.to_string();
        self.inner
            .apply_or_restore(&mut state, batch, &context, |s| {
                if let Some(ns) = s.networks.get_mut(&network) {
                    for (m, _) in &stale {
                        ns.leases.remove(m);
                    }
                    ns.leases.insert(mac, ip);
                }
            })
            .await
    }

    /// Starts the task that puts our tables back (with a warning) when something removed
    /// them, checking every [`WATCHDOG_INTERVAL`]. It ends once every clone of this
    /// `Firewall` has been dropped. Must be called inside a tokio runtime.
    pub fn spawn_watchdog(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCHDOG_INTERVAL).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = inner.check_and_restore().await {
                    warn!("firewall watchdog: {e}");
                }
            }
        })
    }
}

impl Inner {
    async fn apply(&self, batch: Batch<'_>, context: &str) -> Result<(), FirewallError> {
        let doc = batch.to_nftables();
        if doc.objects.is_empty() {
            return Ok(());
        }
        helper::apply_ruleset_with_args_async(&doc, Some(&self.nft), helper::DEFAULT_ARGS)
            .await
            .map_err(|e| nft_error(context, e))
    }

    /// Applies an incremental change and commits it to `state` with `commit`. When the
    /// change fails because our tables were removed meanwhile (a flush racing with us), the
    /// change is committed anyway and the whole state restored, which includes it.
    async fn apply_or_restore(
        &self,
        state: &mut State,
        batch: Batch<'_>,
        context: &str,
        commit: impl FnOnce(&mut State),
    ) -> Result<(), FirewallError> {
        match self.apply(batch, context).await {
            Ok(()) => {
                commit(state);
                Ok(())
            }
            Err(e @ FirewallError::Nft { .. }) => {
                if self.tables_present().await? {
                    return Err(e);
                }
                warn!("firewall rules were removed (flushed?) while {context}, restoring");
                commit(state);
                self.restore(state).await
            }
            Err(e) => Err(e),
        }
    }

    /// True when both of our tables exist.
    async fn tables_present(&self) -> Result<bool, FirewallError> {
        let (inet, bridge) = self.our_tables().await?;
        Ok(inet && bridge)
    }

    /// True when either of our tables exists.
    async fn any_table_present(&self) -> Result<bool, FirewallError> {
        let (inet, bridge) = self.our_tables().await?;
        Ok(inet || bridge)
    }

    /// Which of our two tables (inet, bridge) exist.
    async fn our_tables(&self) -> Result<(bool, bool), FirewallError> {
        let context = "listing tables";
        let doc = helper::get_current_ruleset_with_args_async(Some(&self.nft), ["list", "tables"])
            .await
            .map_err(|e| nft_error(context, e))?;
        let mut inet = false;
        let mut bridge = false;
        for obj in doc.objects.iter() {
            if let NfObject::ListObject(NfListObject::Table(t)) = obj {
                if t.name == TABLE {
                    match t.family {
                        NfFamily::INet => inet = true,
                        NfFamily::Bridge => bridge = true,
                        _ => {}
                    }
                }
            }
        }
        Ok((inet, bridge))
    }

    async fn check_and_restore(&self) -> Result<(), FirewallError> {
        let state = self.state.lock().await;
        if state.networks.is_empty() || self.tables_present().await? {
            return Ok(());
        }
        warn!("firewall rules were removed (flushed?), restored");
        self.restore(&state).await
    }

    /// Re-creates both tables from `state` in one transaction, dropping whatever is left of
    /// them first, then re-syncs the Docker rules.
    async fn restore(&self, state: &State) -> Result<(), FirewallError> {
        let mut batch = Batch::new();
        delete_tables(&mut batch);
        if !state.networks.is_empty() {
            add_tables(&mut batch);
            for ns in state.networks.values() {
                network_objects(&mut batch, ns);
            }
        }
        self.apply(batch, "restoring the firewall rules").await?;
        for ns in state.networks.values() {
            if ns.net.nat {
                enable_ip_forward()?;
                if let Err(e) = self.docker_remove(&ns.net.name).await {
                    warn!(network = %ns.net.name, "{e}");
                }
                self.docker_sync(&ns.net).await;
            }
        }
        Ok(())
    }

    /// Handles Docker's `FORWARD` policy drop for a NAT network (see `add_network`).
    /// Failures here only cost outside access, so they are logged, not returned.
    async fn docker_sync(&self, net: &FirewallNetwork) {
        let (drop_policy, docker_user) = match self.docker_forward_status().await {
            Ok(s) => s,
            Err(e) => {
                warn!(network = %net.name, "could not check for a FORWARD drop policy (Docker): {e}");
                return;
            }
        };
        if !drop_policy {
            return;
        }
        if !docker_user {
            warn!(
                network = %net.name, bridge = %net.bridge,
                "table ip filter has a FORWARD chain with policy drop (Docker?) but no DOCKER-USER \
                 chain: VMs on shared network {:?} will have no outside access. Fix: allow the \
                 bridge, e.g. `iptables -I FORWARD -i {br} -j ACCEPT; iptables -I FORWARD -o {br} \
                 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`, or start Docker (it creates \
                 DOCKER-USER) before the broker.",
                net.name, br = net.bridge
            );
            return;
        }
        let mut batch = Batch::new();
        let comment = format!("{DOCKER_COMMENT_PREFIX}{}", net.name);
        for expr in [
            vec![
                matches(meta(MetaKey::Iifname), Operator::EQ, s(&net.bridge)),
                accept(),
            ],
            vec![
                matches(meta(MetaKey::Oifname), Operator::EQ, s(&net.bridge)),
                ct_established(),
                accept(),
            ],
        ] {
            batch.add_cmd(NfCmd::Insert(NfListObject::Rule(Rule {
                family: NfFamily::IP,
                table: "filter".into(),
                chain: "DOCKER-USER".into(),
                expr: expr.into(),
                comment: Some(comment.clone().into()),
                ..Rule::default()
            })));
        }
        match self
            .apply(batch, "inserting accept rules into ip filter DOCKER-USER")
            .await
        {
            Ok(()) => info!(
                network = %net.name, bridge = %net.bridge,
                "FORWARD policy is drop (Docker): accept rules for the bridge inserted into DOCKER-USER"
            ),
            Err(e) => warn!(network = %net.name, "{e}: VMs will have no outside access"),
        }
    }

    /// (FORWARD chain of `ip filter` has policy drop, `DOCKER-USER` chain exists there).
    async fn docker_forward_status(&self) -> Result<(bool, bool), FirewallError> {
        let doc =
            helper::get_current_ruleset_with_args_async(Some(&self.nft), ["list", "chains", "ip"])
                .await
                .map_err(|e| nft_error("listing the chains of family ip", e))?;
        let mut drop_policy = false;
        let mut docker_user = false;
        for obj in doc.objects.iter() {
            if let NfObject::ListObject(NfListObject::Chain(c)) = obj {
                if c.table != "filter" {
                    continue;
                }
                if c.name == "FORWARD"
                    && c.hook == Some(NfHook::Forward)
                    && c.policy == Some(NfChainPolicy::Drop)
                {
                    drop_policy = true;
                }
                if c.name == "DOCKER-USER" {
                    docker_user = true;
                }
            }
        }
        Ok((drop_policy, docker_user))
    }

    /// Deletes the rules tagged for `network` from `ip filter DOCKER-USER`, if any.
    async fn docker_remove(&self, network: &str) -> Result<(), FirewallError> {
        let context = "listing ip filter DOCKER-USER";
        let raw = match helper::get_current_ruleset_raw_async(
            Some(&self.nft),
            ["-a", "list", "chain", "ip", "filter", "DOCKER-USER"],
        )
        .await
        {
            Ok(raw) => raw,
            // No such table or chain: nothing of ours can be there.
            Err(NftablesError::NftFailed { .. }) => return Ok(()),
            Err(e) => return Err(nft_error(context, e)),
        };
        // Parsed as plain JSON rather than with the crate's types: Docker's rules are written
        // by iptables-nft and may hold statements (xt matches) the crate cannot deserialize.
        let value: serde_json::Value =
            serde_json::from_str(&raw).map_err(|e| FirewallError::NftOutput {
                context: context.into(),
                detail: e.to_string(),
            })?;
        let tag = format!("{DOCKER_COMMENT_PREFIX}{network}");
        let mut batch = Batch::new();
        let mut n = 0;
        for obj in value["nftables"].as_array().into_iter().flatten() {
            let rule = &obj["rule"];
            if rule["comment"].as_str() == Some(tag.as_str()) {
                if let Some(handle) = rule["handle"].as_u64().and_then(|h| u32::try_from(h).ok()) {
                    batch.delete(NfListObject::Rule(Rule {
                        family: NfFamily::IP,
                        table: "filter".into(),
                        chain: "DOCKER-USER".into(),
                        handle: Some(handle),
                        ..Rule::default()
                    }));
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.apply(batch, "deleting our rules from ip filter DOCKER-USER")
                .await?;
            debug!(network, rules = n, "removed our rules from DOCKER-USER");
        }
        Ok(())
    }
}

fn enable_ip_forward() -> Result<(), FirewallError> {
    // /proc/sys/net is per network namespace: the one of the thread opening the file.
    let current = std::fs::read_to_string(IP_FORWARD).map_err(FirewallError::IpForward)?;
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1\n").map_err(FirewallError::IpForward)?;
    info!("enabled IPv4 forwarding ({IP_FORWARD}=1) for shared networks; it is left on at exit");
    Ok(())
}

fn validate_ifname(name: &str) -> Result<(), FirewallError> {
    // IFNAMSIZ is 16 including the NUL.
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
        return Err(FirewallError::Invalid {
            what: "interface name",
            detail: format!("{name:?}"),
        });
    }
    Ok(())
}

fn validate_network(net: &FirewallNetwork) -> Result<(), FirewallError> {
    // Network names end up in nft object names (limited to 256 bytes) and comments; the
    // protocol's rule keeps them short and made of safe characters.
    crate::protocol::validate_network_name(&net.name).map_err(|detail| FirewallError::Invalid {
        what: "network name",
        detail,
    })?;
    validate_ifname(&net.bridge)?;
    // A prefix, so shorter than a whole name, and no nft wildcard or escape of its own.
    validate_ifname(&net.tap_prefix)?;
    if net.tap_prefix.contains(['*', '\\']) {
        return Err(FirewallError::Invalid {
            what: "TAP prefix",
            detail: format!("{:?}", net.tap_prefix),
        });
    }
    if !net.subnet.contains(&net.gateway) {
        return Err(FirewallError::Invalid {
            what: "network",
            detail: format!(
                "gateway {} is outside subnet {} of network {:?}",
                net.gateway, net.subnet, net.name
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> FirewallNetwork {
        FirewallNetwork {
            name: "n1".into(),
            bridge: "vmnbr0".into(),
            subnet: "10.77.0.0/24".parse().unwrap(),
            gateway: "10.77.0.1".parse().unwrap(),
            nat: true,
            anti_spoofing: true,
            dhcp: true,
            tap_prefix: "vmnt9-".into(),
        }
    }

    #[test]
    fn invalid_definitions_are_refused() {
        let mut n = net();
        n.gateway = "10.78.0.1".parse().unwrap();
        assert!(validate_network(&n).is_err());
        let mut n = net();
        n.bridge = "a-very-long-bridge-name".into();
        assert!(validate_network(&n).is_err());
        assert!(validate_network(&net()).is_ok());
    }
}
