"""The shared vectors (tests/vectors/messages.json) against this client."""

import gc
import os
import socket
import threading

import pytest

import vmnet_broker as vb


def message(t):
    if "bytes" in t:
        return t["bytes"].encode()
    return bytes.fromhex(t["hex"])


def test_header(vectors):
    assert vectors["protocol_version"] == vb.PROTOCOL_VERSION
    assert vectors["max_message"] == vb.MAX_MESSAGE


def test_encode_requests(vectors):
    assert vectors["encode_requests"]
    for t in vectors["encode_requests"]:
        r = t["request"]
        if r["command"] == "acquire":
            got = vb.encode_acquire(r["network_name"], r.get("mac"))
        elif r["command"] == "list":
            got = vb.encode_list()
        elif r["command"] == "show":
            got = vb.encode_show(r["network_name"])
        elif r["command"] == "leases":
            got = vb.encode_leases(r.get("network_name"))
        elif r["command"] == "forward":
            got = vb.encode_forward(r["network_name"], r["protocol"], r["external_port"],
                                    r["internal_port"], r["interface"])
        elif r["command"] == "metrics":
            got = vb.encode_metrics()
        else:
            got = vb.encode_status()
        assert got == t["bytes"].encode(), t["description"]


def test_replies(vectors):
    assert vectors["replies"]
    for t in vectors["replies"]:
        what = t["description"]
        expect = t["expect"]
        if expect == "invalid_reply":
            with pytest.raises(vb.InvalidReply) as e:
                vb.parse_reply(message(t))
            assert e.value.code == vb.INVALID_REPLY, what
            continue
        kind, value = vb.parse_reply(message(t))
        if "error" in expect:
            assert kind == "error", what
            assert (value.code, value.message) == (expect["error"], expect["message"]), what
            assert isinstance(value, vb.BrokerError)
        else:
            assert {kind: value} == expect, what


def test_strerror(vectors):
    for t in vectors["strerror"]:
        assert vb.strerror(t["code"]) == t["string"]
        if t["name"]:
            assert getattr(vb, t["name"]) == t["code"]
    assert vb.XPC_FAILURE == vb.BROKER_UNREACHABLE


def test_error_classes_follow_codes():
    for cls, code in [(vb.BrokerUnreachable, 1), (vb.InvalidReply, 2), (vb.NotAllowed, 3),
                      (vb.InvalidRequest, 4), (vb.NotFound, 5), (vb.CreateFailure, 6),
                      (vb.InternalError, 7), (vb.PortInUse, 8)]:
        e = vb.BrokerError(code, "detail")
        assert type(e) is cls and e.code == code and e.message == "detail"
        assert "detail" in str(e) and vb.strerror(code) in str(e)
        assert cls().message == vb.strerror(code)
    unknown = vb.BrokerError(99)
    assert type(unknown) is vb.BrokerError and unknown.code == 99
    assert "(unknown status)" in str(unknown)


# A real SOCK_SEQPACKET socketpair with the test playing the broker, for replies the
# real broker never sends (fd count mismatches).

NET_REPLY = (b'{"network":{"name":"n","mode":"host","subnet":"10.0.0.0/24","gateway":"10.0.0.1",'
             b'"mask":"255.255.255.0","mtu":1500,"bridge":"b","interface":"t0",'
             b'"mac":"52:00:00:00:00:01"}}')


def fake_client(reply, fds=()):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = object.__new__(vb.Client)
    client.path = "socketpair"
    client._lock = threading.Lock()
    client._sock = ours

    def serve():
        theirs.recv(vb.MAX_MESSAGE)
        socket.send_fds(theirs, [reply], list(fds))
        theirs.close()
    threading.Thread(target=serve, daemon=True).start()
    return client


def open_fds():
    # Collect first: a socket an earlier test dropped may otherwise be closed by the
    # garbage collector in the middle of a count and look like an fd this test closed.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_network_reply_hands_over_the_fd():
    with open(os.devnull) as f:
        with fake_client(NET_REPLY, [f.fileno()]) as c:
            net = c.acquire("n")
            assert os.path.sameopenfile(net.fd, f.fileno())
            assert not os.get_inheritable(net.fd)
            assert (net.interface, net.mtu, net.info["bridge"]) == ("t0", 1500, "b")
            net.close()
            assert net.fd == -1 and c._sock is not None


def test_network_reply_without_fd_is_invalid():
    with fake_client(NET_REPLY) as c:
        with pytest.raises(vb.InvalidReply):
            c.acquire("n")


def test_fds_of_error_replies_are_closed():
    with open(os.devnull) as f:
        before = open_fds()
        with fake_client(b'{"error":6,"message":"boom"}', [f.fileno(), f.fileno()]) as c:
            with pytest.raises(vb.CreateFailure, match="boom"):
                c.acquire("n")
            c.close()
        assert open_fds() == before


def test_broker_closing_is_unreachable():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    client = object.__new__(vb.Client)
    client.path, client._lock, client._sock = "socketpair", threading.Lock(), ours
    with pytest.raises(vb.BrokerUnreachable):
        client.status()
    client.close()
