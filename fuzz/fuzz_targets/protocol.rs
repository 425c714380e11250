//! The broker's request parser (`Request::parse`, what the server calls on every message
//! from a client) and the clients' reply parser (`Reply::parse`), on arbitrary bytes.
//! Beyond not panicking: whatever parses must survive its own encoding unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmnet_broker::protocol::{MAX_MESSAGE, Reply, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::parse(data) {
        assert!(data.len() <= MAX_MESSAGE, "accepted an oversized request");
        let again = Request::parse(&req.to_bytes()).expect("an encoded request parses");
        assert_eq!(again, req, "request changed through to_bytes/parse");
    }
    if let Ok(reply) = Reply::parse(data) {
        let again = Reply::parse(&reply.to_bytes()).expect("an encoded reply parses");
        assert_eq!(again, reply, "reply changed through to_bytes/parse");
    }
});
