//! The original broker's XPC protocol as plain dictionary operations, so the translation
//! between XPC messages and registry calls is platform-neutral and tested on Linux. The
//! macOS XPC server (`backend::macos::server`) implements [`Dictionary`] over real
//! `xpc_object_t` dictionaries; the tests use an in-memory one.
//!
//! Wire facts (kept compatible with the original's C, Go and Swift clients):
//! - a request is a dictionary with `command` (string, `"acquire"`) and `network_name`
//!   (string); other keys are ignored, and no version key is required;
//! - a success reply holds `network`: the vmnet network serialization, set as an XPC value;
//! - a failure reply holds `error`: an int64 with the original codes (3..7);
//! - a missing or unknown command, or a missing name, is `INVALID_REQUEST` (4).
//!
//! Our extra command `status` is one the original answers with 4, so an old broker and a
//! new client still understand each other; its reply holds `status`, the JSON document of
//! docs/protocol.md.

use crate::answers::{status_reply, wire_error};
use crate::backend::Backend;
use crate::error::chain;
use crate::protocol::{BrokerError, ErrorCode, MAX_MESSAGE, validate_network_name};
use crate::registry::{ClientId, Registry};
use std::sync::Arc;
use tracing::{info, warn};

/// The original broker's Mach service, looked up by every client.
pub const MACH_SERVICE: &str = "com.github.nirs.vmnet-broker";
/// Environment variable naming another Mach service (for testing), for server and clients.
pub const SERVICE_ENV: &str = "VMNET_BROKER_SERVICE";

pub const KEY_COMMAND: &str = "command";
pub const KEY_NETWORK_NAME: &str = "network_name";
pub const KEY_NETWORK: &str = "network";
pub const KEY_ERROR: &str = "error";
pub const KEY_STATUS: &str = "status";
pub const COMMAND_ACQUIRE: &str = "acquire";
pub const COMMAND_STATUS: &str = "status";

/// The few dictionary operations the protocol needs. `Value` is what the backend hands
/// out for a network (the vmnet serialization on macOS).
pub trait Dictionary {
    type Value;
    /// The string under `key`; `None` when it is missing or not a string.
    fn get_string(&self, key: &str) -> Option<String>;
    fn set_string(&mut self, key: &str, value: &str);
    fn set_int64(&mut self, key: &str, value: i64);
    fn set_value(&mut self, key: &str, value: &Self::Value);
}

/// A request the broker understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XpcRequest {
    Acquire { network_name: String },
    Status,
}

/// Reads a request dictionary. Whatever the original would refuse is `INVALID_REQUEST`.
pub fn parse_request(d: &impl Dictionary) -> Result<XpcRequest, BrokerError> {
    let command = d
        .get_string(KEY_COMMAND)
        .ok_or_else(|| BrokerError::invalid(format!("{KEY_COMMAND:?} is missing")))?;
    match command.as_str() {
        COMMAND_ACQUIRE => {
            let network_name = d
                .get_string(KEY_NETWORK_NAME)
                .ok_or_else(|| BrokerError::invalid(format!("{KEY_NETWORK_NAME:?} is missing")))?;
            // Refused up front like on Linux: a name that cannot be a file name is no network.
            validate_network_name(&network_name)
                .map_err(|e| BrokerError::invalid(e.to_string()))?;
            Ok(XpcRequest::Acquire { network_name })
        }
        COMMAND_STATUS => Ok(XpcRequest::Status),
        other => Err(BrokerError::invalid(format!(
            "unknown command {:?}",
            other.chars().take(64).collect::<String>()
        ))),
    }
}

/// What a request gets back, before it is written into a reply dictionary.
#[derive(Debug)]
pub enum Answer<E> {
    /// The endpoint (the network's serialization). The broker drops its copy once the
    /// reply holds it.
    Network(E),
    /// The `status` document (JSON).
    Status(String),
    Error(BrokerError),
}

/// Carries a parsed (or refused) request through the registry for one connected peer.
pub async fn answer<B: Backend>(
    registry: &Arc<Registry<B>>,
    client: ClientId,
    request: Result<XpcRequest, BrokerError>,
) -> Answer<B::Endpoint> {
    match request {
        Err(e) => {
            warn!(client, "bad request: {}", e.message);
            Answer::Error(e)
        }
        Ok(XpcRequest::Status) => {
            let status = status_reply(registry.status().await).fit(MAX_MESSAGE);
            match serde_json::to_string(&status) {
                Ok(json) => Answer::Status(json),
                Err(e) => Answer::Error(BrokerError::new(
                    ErrorCode::InternalError,
                    format!("cannot encode the status: {e}"),
                )),
            }
        }
        Ok(XpcRequest::Acquire { network_name }) => {
            match registry.acquire(client, &network_name, None, false).await {
                Ok(acquired) => {
                    // On disk before the client hears of it, as on Linux (server.rs).
                    registry.flush_state().await;
                    info!(client, network = network_name, "acquired");
                    Answer::Network(acquired.attachment.endpoint)
                }
                Err(e) => {
                    let err = wire_error(&e);
                    warn!(
                        client,
                        network = network_name,
                        "acquire failed: {}",
                        chain(&e)
                    );
                    Answer::Error(err)
                }
            }
        }
    }
}

/// Writes an answer into the reply dictionary (made with `xpc_dictionary_create_reply`).
/// An error carries only the code, as the original's: its clients read nothing else.
pub fn write_reply<D: Dictionary>(answer: &Answer<D::Value>, reply: &mut D) {
    match answer {
        Answer::Network(n) => reply.set_value(KEY_NETWORK, n),
        Answer::Status(json) => reply.set_string(KEY_STATUS, json),
        Answer::Error(e) => reply.set_int64(KEY_ERROR, e.code.code()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{
        AttachRequest, Attachment, BackendError, EndpointId, NetworkDetails, PlatformDetails,
    };
    use crate::config::{ConfigDir, NetworkConfig};
    use crate::policy::{Peer, SystemDirectory};
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use std::time::Duration;

    /// An XPC dictionary in memory: strings, int64s and fake serializations.
    #[derive(Debug, Default, Clone, PartialEq)]
    enum Item {
        #[default]
        Null,
        Str(String),
        Int(i64),
        Value(FakeSerialization),
    }

    #[derive(Debug, Default)]
    struct FakeDictionary(BTreeMap<String, Item>);

    impl FakeDictionary {
        fn of(pairs: &[(&str, Item)]) -> Self {
            Self(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            )
        }
    }

    impl Dictionary for FakeDictionary {
        type Value = FakeSerialization;
        fn get_string(&self, key: &str) -> Option<String> {
            match self.0.get(key)? {
                Item::Str(s) => Some(s.clone()),
                _ => None,
            }
        }
        fn set_string(&mut self, key: &str, value: &str) {
            self.0.insert(key.into(), Item::Str(value.into()));
        }
        fn set_int64(&mut self, key: &str, value: i64) {
            self.0.insert(key.into(), Item::Int(value));
        }
        fn set_value(&mut self, key: &str, value: &FakeSerialization) {
            self.0.insert(key.into(), Item::Value(value.clone()));
        }
    }

    /// What `vmnet_network_copy_serialization` would return: here the network's name and
    /// the endpoint's serial.
    #[derive(Debug, Clone, PartialEq)]
    struct FakeSerialization {
        network: String,
        serial: u64,
    }

    /// A backend whose networks are names; counts creations.
    #[derive(Default)]
    struct FakeVmnet {
        created: Mutex<Vec<String>>,
    }

    impl Backend for FakeVmnet {
        type Network = (String, u8);
        type Endpoint = FakeSerialization;

        async fn create(&self, c: &NetworkConfig) -> Result<Self::Network, BackendError> {
            let mut created = self.created.lock().unwrap();
            created.push(c.name.clone());
            Ok((c.name.clone(), created.len() as u8))
        }
        fn details(&self, n: &Self::Network) -> NetworkDetails {
            NetworkDetails {
                subnet: format!("192.168.{}.0/24", n.1).parse().unwrap(),
                gateway: Ipv4Addr::new(192, 168, n.1, 1),
                ipv6_prefix: None,
                mtu: 1500,
                platform: PlatformDetails::new(),
            }
        }
        async fn attach(
            &self,
            n: &Self::Network,
            r: &AttachRequest,
        ) -> Result<Attachment<FakeSerialization>, BackendError> {
            Ok(Attachment {
                id: EndpointId(format!("{}-{}", n.0, r.serial)),
                platform: PlatformDetails::new(),
                endpoint: FakeSerialization {
                    network: n.0.clone(),
                    serial: r.serial,
                },
                answering: Default::default(),
            })
        }
        async fn release(&self, _: &Self::Network, _: &EndpointId) -> Result<(), BackendError> {
            Ok(())
        }
        async fn live_endpoints(
            &self,
            _: &Self::Network,
        ) -> Result<BTreeSet<EndpointId>, BackendError> {
            // Like vmnet: the broker keeps nothing of a serialization it handed out.
            Ok(BTreeSet::new())
        }
        async fn destroy(&self, _: &Self::Network) -> Result<(), BackendError> {
            Ok(())
        }
        async fn adopt(
            &self,
            record: &crate::state::NetworkRecord,
        ) -> Result<Self::Network, BackendError> {
            Err(BackendError::Vanished(record.config.name.clone()))
        }
        async fn remove_stale(&self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    struct Lab {
        _dir: tempfile::TempDir,
        registry: Arc<Registry<FakeVmnet>>,
        client: ClientId,
    }

    /// A registry with networks net0..net9 (besides `shared` and `host`) and one client.
    async fn lab() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("net{i}.json")), "{}").unwrap();
        }
        let registry = Registry::new(
            FakeVmnet::default(),
            ConfigDir::new(dir.path()),
            Box::new(SystemDirectory),
            Duration::from_secs(120),
        );
        let peer = Peer {
            pid: 42,
            uid: 501,
            gid: 20,
            groups: None,
        };
        let client = registry.connect(peer).await.unwrap();
        Lab {
            _dir: dir,
            registry,
            client,
        }
    }

    /// One request dictionary through parse, the registry and the reply, as the server
    /// does it.
    async fn roundtrip(lab: &Lab, request: FakeDictionary) -> FakeDictionary {
        let parsed = parse_request(&request);
        let answer = answer(&lab.registry, lab.client, parsed).await;
        let mut reply = FakeDictionary::default();
        write_reply(&answer, &mut reply);
        reply
    }

    fn acquire(name: &str) -> FakeDictionary {
        FakeDictionary::of(&[
            (KEY_COMMAND, Item::Str("acquire".into())),
            (KEY_NETWORK_NAME, Item::Str(name.into())),
        ])
    }

    fn error_of(reply: &FakeDictionary) -> Option<i64> {
        match reply.0.get(KEY_ERROR) {
            Some(Item::Int(code)) => Some(*code),
            None => None,
            other => panic!("error is not an int64: {other:?}"),
        }
    }

    #[tokio::test]
    async fn acquire_replies_with_the_serialization_only() {
        let lab = lab().await;
        let reply = roundtrip(&lab, acquire("shared")).await;
        assert_eq!(reply.0.len(), 1, "{reply:?}");
        match reply.0.get(KEY_NETWORK) {
            Some(Item::Value(s)) => assert_eq!(s.network, "shared"),
            other => panic!("no network in the reply: {other:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_requests_are_invalid_requests() {
        let lab = lab().await;
        let cases = [
            (
                "no command",
                FakeDictionary::of(&[(KEY_NETWORK_NAME, Item::Str("shared".into()))]),
            ),
            (
                "command not a string",
                FakeDictionary::of(&[
                    (KEY_COMMAND, Item::Int(1)),
                    (KEY_NETWORK_NAME, Item::Str("shared".into())),
                ]),
            ),
            (
                "unknown command",
                FakeDictionary::of(&[
                    (KEY_COMMAND, Item::Str("release".into())),
                    (KEY_NETWORK_NAME, Item::Str("shared".into())),
                ]),
            ),
            (
                "no name",
                FakeDictionary::of(&[(KEY_COMMAND, Item::Str("acquire".into()))]),
            ),
            (
                "name not a string",
                FakeDictionary::of(&[
                    (KEY_COMMAND, Item::Str("acquire".into())),
                    (KEY_NETWORK_NAME, Item::Null),
                ]),
            ),
            ("empty dictionary", FakeDictionary::default()),
        ];
        for (what, request) in cases {
            let reply = roundtrip(&lab, request).await;
            assert_eq!(error_of(&reply), Some(4), "{what}: {reply:?}");
            assert_eq!(reply.0.len(), 1, "{what}: only the error: {reply:?}");
        }
        assert!(lab.registry.backend().created.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn extra_keys_are_ignored() {
        let lab = lab().await;
        let mut request = acquire("host");
        request.0.insert("version".into(), Item::Int(99));
        request.0.insert("mac".into(), Item::Str("nonsense".into()));
        let reply = roundtrip(&lab, request).await;
        assert_eq!(error_of(&reply), None, "{reply:?}");
        assert!(matches!(reply.0.get(KEY_NETWORK), Some(Item::Value(_))));
    }

    #[tokio::test]
    async fn unknown_network_is_not_found() {
        let lab = lab().await;
        let reply = roundtrip(&lab, acquire("no-such-network")).await;
        assert_eq!(error_of(&reply), Some(5), "{reply:?}");
    }

    #[tokio::test]
    async fn the_ninth_network_of_a_peer_is_an_internal_error() {
        let lab = lab().await;
        for i in 0..8 {
            let reply = roundtrip(&lab, acquire(&format!("net{i}"))).await;
            assert_eq!(error_of(&reply), None, "net{i}: {reply:?}");
        }
        let reply = roundtrip(&lab, acquire("net8")).await;
        assert_eq!(error_of(&reply), Some(7), "{reply:?}");
        // A network the peer already holds still counts once.
        let reply = roundtrip(&lab, acquire("net0")).await;
        assert_eq!(error_of(&reply), None, "{reply:?}");
    }

    #[tokio::test]
    async fn the_same_network_nine_times_counts_once() {
        let lab = lab().await;
        let mut serials = BTreeSet::new();
        for _ in 0..9 {
            let reply = roundtrip(&lab, acquire("shared")).await;
            match reply.0.get(KEY_NETWORK) {
                Some(Item::Value(s)) => assert!(serials.insert(s.serial)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(*lab.registry.backend().created.lock().unwrap(), ["shared"]);
        let snapshot = lab.registry.status().await;
        assert_eq!(snapshot.clients[0].networks, ["shared"]);
        assert_eq!(snapshot.networks[0].clients, 1);
        // And seven more distinct networks still fit under the limit of eight.
        for i in 0..7 {
            let reply = roundtrip(&lab, acquire(&format!("net{i}"))).await;
            assert_eq!(error_of(&reply), None, "net{i}: {reply:?}");
        }
    }

    #[tokio::test]
    async fn status_is_a_command_of_ours() {
        let lab = lab().await;
        roundtrip(&lab, acquire("host")).await;
        let reply = roundtrip(
            &lab,
            FakeDictionary::of(&[(KEY_COMMAND, Item::Str("status".into()))]),
        )
        .await;
        let Some(Item::Str(json)) = reply.0.get(KEY_STATUS) else {
            panic!("{reply:?}");
        };
        let status: crate::protocol::Status = serde_json::from_str(json).unwrap();
        assert_eq!(status.networks.len(), 1);
        assert_eq!(status.networks[0].name, "host");
        assert_eq!(status.clients[0].pid, 42);
    }
}
