//! Holds the client crate's protocol (client/src/protocol.rs) to the shared vectors in tests/vectors/messages.json, the same
//! file the Go, Python and C clients are tested against.

use serde_json::Value;
use vmnet_broker_client::protocol::{
    ErrorCode, ForwardInfo, ForwardSpec, LeaseList, MAX_MESSAGE, NetworkDetail, NetworkInfo,
    NetworkList, PROTOCOL_VERSION, Reply, Request, Status, parse_guest_mac, strerror,
};

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/messages.json");
    let text = std::fs::read_to_string(path).expect("read vectors");
    serde_json::from_str(&text).expect("vectors are JSON")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The message bytes of a vector, whichever way it spells them.
fn message(v: &Value) -> Vec<u8> {
    if let Some(s) = v["bytes"].as_str() {
        return s.as_bytes().to_vec();
    }
    if let Some(h) = v["hex"].as_str() {
        return hex(h);
    }
    let r = &v["repeat"];
    let byte = r["byte"].as_str().expect("repeat.byte").as_bytes();
    assert_eq!(byte.len(), 1);
    vec![byte[0]; r["count"].as_u64().expect("repeat.count") as usize]
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    let l = v[key].as_array().expect(key);
    assert!(!l.is_empty(), "{key} is empty");
    l
}

/// A `list`, `show`, `leases` or `forward` request as a vector spells it.
fn inspection(command: &str, r: &Value) -> Request {
    let name = r["network_name"].as_str().map(str::to_string);
    let port = |key: &str| {
        r[key]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect(key)
    };
    match command {
        "forward" => Request::Forward(ForwardSpec {
            network_name: name.expect("forward names a network"),
            protocol: r["protocol"].as_str().unwrap().to_string(),
            external_port: port("external_port"),
            internal_port: port("internal_port"),
            interface: r["interface"].as_str().unwrap().to_string(),
        }),
        "list" => Request::List,
        "show" => Request::Show {
            network_name: name.expect("show names a network"),
        },
        "leases" => Request::Leases { network_name: name },
        "metrics" => Request::Metrics,
        other => panic!("unknown command {other}"),
    }
}

#[test]
fn header_matches() {
    let v = vectors();
    assert_eq!(v["protocol_version"], PROTOCOL_VERSION);
    assert_eq!(v["max_message"], MAX_MESSAGE as u64);
}

#[test]
fn encodes_requests_to_the_exact_bytes() {
    for t in list(&vectors(), "encode_requests") {
        let r = &t["request"];
        let req = match r["command"].as_str().unwrap() {
            "acquire" => Request::Acquire {
                network_name: r["network_name"].as_str().unwrap().to_string(),
                mac: r["mac"]
                    .as_str()
                    .map(|m| parse_guest_mac(m).expect("vector MAC is valid")),
                persistent: r["persistent"].as_bool().unwrap_or(false),
            },
            "status" => Request::Status,
            other => inspection(other, r),
        };
        assert_eq!(
            String::from_utf8(req.to_bytes()).unwrap(),
            t["bytes"].as_str().unwrap(),
            "{}",
            t["description"]
        );
    }
}

#[test]
fn accepts_the_accepted_requests() {
    for t in list(&vectors(), "accepted_requests") {
        let got =
            Request::parse(&message(t)).unwrap_or_else(|e| panic!("{}: {e}", t["description"]));
        let p = &t["parsed"];
        let want = match p["command"].as_str().unwrap() {
            "acquire" => Request::Acquire {
                network_name: p["network_name"].as_str().unwrap().to_string(),
                mac: p["mac"].as_str().map(|m| parse_guest_mac(m).unwrap()),
                persistent: p["persistent"].as_bool().unwrap_or(false),
            },
            "status" => Request::Status,
            other => inspection(other, p),
        };
        assert_eq!(got, want, "{}", t["description"]);
        if let (Request::Acquire { mac: Some(mac), .. }, Some(s)) = (&got, p["mac"].as_str()) {
            assert_eq!(mac.to_string(), s, "MACs are written lowercase");
        }
    }
}

#[test]
fn rejects_the_bad_requests_with_their_code() {
    for t in list(&vectors(), "bad_requests") {
        let err = Request::parse(&message(t)).expect_err(t["description"].as_str().unwrap());
        assert_eq!(
            err.code.code(),
            t["error"].as_i64().unwrap(),
            "{}",
            t["description"]
        );
        assert!(!err.message.is_empty());
    }
}

#[test]
fn parses_replies_as_the_vectors_say() {
    for t in list(&vectors(), "replies") {
        let what = t["description"].as_str().unwrap();
        let got = Reply::parse(&message(t));
        let expect = &t["expect"];
        if expect == "invalid_reply" {
            assert_eq!(got.expect_err(what).code, ErrorCode::InvalidReply, "{what}");
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
        if let Some(n) = expect.get("network") {
            let want: NetworkInfo = serde_json::from_value(n.clone()).unwrap();
            assert_eq!(got, Reply::Network(want), "{what}");
        } else if let Some(s) = expect.get("status") {
            let want: Status = serde_json::from_value(s.clone()).unwrap();
            assert_eq!(got, Reply::Status(want), "{what}");
        } else if let Some(l) = expect.get("list") {
            let want: NetworkList = serde_json::from_value(l.clone()).unwrap();
            assert_eq!(got, Reply::List(want), "{what}");
        } else if let Some(d) = expect.get("show") {
            let want: NetworkDetail = serde_json::from_value(d.clone()).unwrap();
            assert_eq!(got, Reply::Show(want), "{what}");
        } else if let Some(l) = expect.get("leases") {
            let want: LeaseList = serde_json::from_value(l.clone()).unwrap();
            assert_eq!(got, Reply::Leases(want), "{what}");
        } else if let Some(f) = expect.get("forward") {
            let want: ForwardInfo = serde_json::from_value(f.clone()).unwrap();
            assert_eq!(got, Reply::Forward(want), "{what}");
        } else if let Some(m) = expect.get("metrics") {
            let want = m.as_str().expect("metrics is a string").to_string();
            assert_eq!(got, Reply::Metrics(want), "{what}");
        } else {
            let Reply::Error(e) = got else {
                panic!("{what}: expected an error, got {got:?}")
            };
            assert_eq!(e.code.code(), expect["error"].as_i64().unwrap(), "{what}");
            assert_eq!(e.message, expect["message"].as_str().unwrap(), "{what}");
        }
    }
}

#[test]
fn strerror_table() {
    for t in list(&vectors(), "strerror") {
        let code = t["code"].as_i64().unwrap();
        assert_eq!(strerror(code), t["string"].as_str().unwrap(), "code {code}");
        if code != 0 {
            assert_eq!(
                ErrorCode::from_code(code).code(),
                code,
                "codes are preserved"
            );
            assert_eq!(ErrorCode::from_code(code).strerror(), strerror(code));
        }
    }
}
