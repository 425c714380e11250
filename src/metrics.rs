//! The broker's metrics, as OpenMetrics text (prometheus-client): counters that the
//! server, the DNS servers and the firewall watchdog bump as things happen, and gauges
//! read from the registry when someone asks (`metrics` request, `serve --metrics-file`).
//!
//! The counters live in one process-wide [`Counters`]: the DNS servers and the firewall
//! watchdog are started deep inside the backend, and threading a handle through every
//! layer for a few atomic increments would change a dozen signatures for nothing. They
//! count from the start of this process (OpenMetrics counters may reset; `_created` is
//! not exposed, scrapers see the reset as a drop).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::LazyLock;

/// Label sets as `(name, value)` pairs: the crate encodes them as they are.
type Labels = Vec<(&'static str, String)>;

/// Counters since this process started.
#[derive(Default)]
pub struct Counters {
    /// Successful acquires, by network.
    pub acquires: Family<Labels, Counter>,
    /// Error replies, by protocol code (docs/protocol.md, Errors) and request.
    pub errors: Family<Labels, Counter>,
    /// DNS queries the networks' servers answered or forwarded, by network.
    pub dns_queries: Family<Labels, Counter>,
    /// Forwarded DNS queries no upstream answered (the VM got SERVFAIL), by network.
    pub dns_upstream_failures: Family<Labels, Counter>,
    /// Times the firewall watchdog found the broker's nftables tables gone and restored them.
    pub firewall_restores: Counter,
    /// 1 when this broker started by adopting a previous broker's networks (a restart
    /// that kept running VMs' networks), else 0.
    pub restarts_with_adoption: Counter,
    /// Networks adopted from the previous broker at start.
    pub adopted_networks: Counter,
    /// Dynamic port forwards added by clients' `forward` requests.
    pub forwards: Family<Labels, Counter>,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(Counters::default);

/// The process's counters.
pub fn counters() -> &'static Counters {
    &COUNTERS
}

/// `[("network", name)]`.
pub fn network(name: &str) -> Labels {
    vec![("network", name.to_string())]
}

/// What one network looks like at the time of the scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkGauges {
    pub name: String,
    pub clients: u64,
    pub taps: u64,
    /// Current DHCP leases and the dynamic pool's size (0 without DHCP).
    pub leases: u64,
    pub pool_size: u64,
    /// Port forwards in place: the network file's and clients'.
    pub forwards: u64,
}

/// Everything read from the registry for one scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Networks that exist (active, idle or being removed).
    pub networks: Vec<NetworkGauges>,
    /// Connected clients.
    pub clients: u64,
}

/// Encodes `counters` and `snapshot` as OpenMetrics text, ending with `# EOF`.
pub fn render(counters: &Counters, snapshot: &Snapshot) -> String {
    let mut r = Registry::with_prefix("vmnet_broker");
    // Clones share their values with the originals: the registry only reads them. A
    // table, in exposition order: each row is a field of `Counters`, its metric name and
    // its help text.
    macro_rules! register_counters {
        ($($field:ident as $name:literal: $help:literal,)*) => {
            $(r.register($name, $help, counters.$field.clone());)*
        };
    }
    register_counters! {
        acquires as "acquires": "Successful acquires, by network",
        errors as "errors": "Error replies, by protocol error code and request",
        dns_queries as "dns_queries": "DNS queries received by the networks' DNS servers",
        dns_upstream_failures as "dns_upstream_failures":
            "Forwarded DNS queries that no upstream answered",
        firewall_restores as "firewall_restores":
            "Times the broker's nftables tables were found removed and restored",
        restarts_with_adoption as "restarts_with_adoption":
            "1 when this broker adopted a previous broker's networks at start",
        adopted_networks as "adopted_networks":
            "Networks adopted from the previous broker at start",
        forwards as "forwards_added":
            "Dynamic port forwards added (forward requests), by network",
    }
    let networks = Gauge::<i64>::default();
    networks.set(snapshot.networks.len() as i64);
    r.register("networks", "Networks that exist", networks);
    let clients = Gauge::<i64>::default();
    clients.set(snapshot.clients as i64);
    r.register("clients", "Connected clients", clients);
    let per_network = |r: &mut Registry, name: &str, help: &str, get: fn(&NetworkGauges) -> u64| {
        let family = Family::<Labels, Gauge>::default();
        for n in &snapshot.networks {
            family.get_or_create(&network(&n.name)).set(get(n) as i64);
        }
        r.register(name, help, family);
    };
    per_network(
        &mut r,
        "network_clients",
        "Clients holding the network",
        |n| n.clients,
    );
    per_network(&mut r, "taps", "TAPs open on the network", |n| n.taps);
    per_network(&mut r, "dhcp_leases", "Current DHCP leases", |n| n.leases);
    per_network(
        &mut r,
        "dhcp_pool_size",
        "Addresses in the network's dynamic DHCP pool",
        |n| n.pool_size,
    );
    per_network(&mut r, "forwards", "Port forwards in place", |n| n.forwards);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges_as_openmetrics() {
        let c = Counters::default();
        c.acquires.get_or_create(&network("shared")).inc();
        c.acquires.get_or_create(&network("shared")).inc();
        c.errors
            .get_or_create(&vec![("code", "5".into()), ("request", "acquire".into())])
            .inc();
        c.firewall_restores.inc();
        let text = render(
            &c,
            &Snapshot {
                networks: vec![NetworkGauges {
                    name: "shared".into(),
                    clients: 1,
                    taps: 2,
                    leases: 1,
                    pool_size: 252,
                    forwards: 0,
                }],
                clients: 1,
            },
        );
        for line in [
            "# TYPE vmnet_broker_acquires counter",
            "vmnet_broker_acquires_total{network=\"shared\"} 2",
            "vmnet_broker_errors_total{code=\"5\",request=\"acquire\"} 1",
            "vmnet_broker_firewall_restores_total 1",
            "vmnet_broker_networks 1",
            "vmnet_broker_taps{network=\"shared\"} 2",
            "vmnet_broker_dhcp_pool_size{network=\"shared\"} 252",
            "vmnet_broker_forwards{network=\"shared\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
