"""Python client of vmnet-broker (docs/protocol.md, version 1). Standard library only.

    with vmnet_broker.acquire_network("shared") as net:
        print(net.interface, net.mac)
        subprocess.run(["qemu-system-x86_64", ..., "-netdev", f"tap,id=n0,fd={net.fd}"],
                       pass_fds=[net.fd])

The broker connection is the lease: everything acquired on a Client is released when
the Client is closed or the process exits. Keep it open while the VM runs.
"""

import array
import json
import os
import re
import socket
import threading

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE", "DEFAULT_SOCKET_PATH", "SOCKET_ENV",
    "SUCCESS", "BROKER_UNREACHABLE", "XPC_FAILURE", "INVALID_REPLY", "NOT_ALLOWED",
    "INVALID_REQUEST", "NOT_FOUND", "CREATE_FAILURE", "INTERNAL_ERROR", "PORT_IN_USE",
    "strerror", "socket_path", "BrokerError", "BrokerUnreachable", "InvalidReply",
    "NotAllowed", "InvalidRequest", "NotFound", "CreateFailure", "InternalError",
    "PortInUse",
    "Client", "Network", "acquire_network",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
DEFAULT_SOCKET_PATH = "/run/vmnet-broker/vmnet-broker.sock"
SOCKET_ENV = "VMNET_BROKER_SOCKET"

# Status codes: the original macOS broker's numbers, never renumbered.
SUCCESS = 0
BROKER_UNREACHABLE = 1
XPC_FAILURE = BROKER_UNREACHABLE  # the original name
INVALID_REPLY = 2
NOT_ALLOWED = 3
INVALID_REQUEST = 4
NOT_FOUND = 5
CREATE_FAILURE = 6
INTERNAL_ERROR = 7
# A port forward's external port is taken; new in this broker (the original has none).
PORT_IN_USE = 8

_STRINGS = {
    SUCCESS: "Success",
    BROKER_UNREACHABLE: "Failed to communicate with the broker",
    INVALID_REPLY: "Invalid reply from the broker",
    NOT_ALLOWED: "You are not allowed to create a network",
    INVALID_REQUEST: "Invalid broker request",
    NOT_FOUND: "Network name not found",
    CREATE_FAILURE: "Failed to create network",
    INTERNAL_ERROR: "Internal or unknown error",
    PORT_IN_USE: "Port already in use",
}


def strerror(code):
    """The original client library's message for a code; "(unknown status)" otherwise."""
    return _STRINGS.get(code, "(unknown status)")


def socket_path():
    """$VMNET_BROKER_SOCKET when set and non-empty, else the default path."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


class BrokerError(Exception):
    """An error from the broker or this library. ``code`` is the status number (kept as
    is when unknown), ``message`` the detail. Subclasses exist for the known codes."""

    code = None

    def __new__(cls, code=None, message=None):
        # BrokerError(5, "...") builds the matching subclass, so callers can catch NotFound.
        if cls is BrokerError and code in _BY_CODE:
            cls = _BY_CODE[code]
        return super().__new__(cls)

    def __init__(self, code=None, message=None):
        if code is None:
            code = type(self).code
        if message is None:
            message = strerror(code)
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self):
        if self.message and self.message != strerror(self.code):
            return "%s (%s, code %d)" % (self.message, strerror(self.code), self.code)
        return "%s (code %d)" % (strerror(self.code), self.code)


class BrokerUnreachable(BrokerError):
    code = BROKER_UNREACHABLE


class InvalidReply(BrokerError):
    code = INVALID_REPLY


class NotAllowed(BrokerError):
    code = NOT_ALLOWED


class InvalidRequest(BrokerError):
    code = INVALID_REQUEST


class NotFound(BrokerError):
    code = NOT_FOUND


class CreateFailure(BrokerError):
    code = CREATE_FAILURE


class InternalError(BrokerError):
    code = INTERNAL_ERROR


class PortInUse(BrokerError):
    code = PORT_IN_USE


_BY_CODE = {c.code: c for c in (BrokerUnreachable, InvalidReply, NotAllowed,
                                InvalidRequest, NotFound, CreateFailure, InternalError,
                                PortInUse)}

# Linux's value; some Python builds do not export the constant.
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)

_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")


def _encode(obj):
    # The canonical bytes every client library sends (tests/vectors/messages.json).
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_acquire(name, mac=None):
    """The bytes of an acquire request. A well-formed MAC is normalized to lowercase
    with colons; anything else is sent as given, for the broker to judge."""
    req = {"command": "acquire", "network_name": name}
    if mac is not None:
        if _MAC.match(mac):
            mac = mac.replace("-", ":").lower()
        req["mac"] = mac
    return _encode(req)


def encode_status():
    return _encode({"command": "status"})


def encode_list():
    return _encode({"command": "list"})


def encode_metrics():
    return _encode({"command": "metrics"})


def encode_show(name):
    return _encode({"command": "show", "network_name": name})


def encode_forward(network, protocol, external_port, internal_port, interface):
    """The bytes of a forward request: the host's ``external_port`` to ``internal_port``
    of the guest behind the caller's TAP ``interface`` on ``network``."""
    return _encode({"command": "forward", "network_name": network, "protocol": protocol,
                    "external_port": external_port, "internal_port": internal_port,
                    "interface": interface})


def encode_leases(name=None):
    """Leases of network ``name``, or of every network the caller may use."""
    req = {"command": "leases"}
    if name is not None:
        req["network_name"] = name
    return _encode(req)


_INFO_FIELDS = {"name": str, "mode": str, "subnet": str, "gateway": str, "mask": str,
                "mtu": "u32", "bridge": str, "interface": str, "mac": str}
_NETSTATUS_FIELDS = {"name": str, "mode": str, "subnet": str, "gateway": str,
                     "bridge": str, "mtu": "u32", "clients": "u64", "taps": [str]}
_CLIENT_FIELDS = {"id": "u64", "pid": "i32", "uid": "u32", "gid": "u32", "networks": [str]}
_STATUS_FIELDS = {"version": str, "protocol": "u32", "pid": "u32",
                  "idle_timeout_seconds": float, "networks": [_NETSTATUS_FIELDS],
                  "clients": [_CLIENT_FIELDS]}
_SUMMARY_FIELDS = {"name": str, "mode": str, "subnets": [str], "state": str,
                   "clients": "u64", "taps": "u64"}
_TAP_FIELDS = {"interface": str}
_TAP_OPTIONAL = {"mac": str, "uid": "u32", "client": "u64", "pid": "i32"}
_DETAIL_FIELDS = {"name": str, "mode": str, "state": str, "config": dict, "mtu": "u32",
                  "platform": dict, "clients": "u64", "forwards": list,
                  "taps": [_TAP_FIELDS]}
_DETAIL_OPTIONAL = {"removal_in_seconds": float, "subnet": str, "gateway": str,
                    "mask": str, "bridge": str}
_LEASE_FIELDS = {"network": str, "mac": str, "ipv4": str, "expires_at": "u64",
                 "expires_in_seconds": "u64"}
_LEASE_OPTIONAL = dict(_TAP_OPTIONAL, ipv6=str, hostname=str, interface=str)
del _LEASE_OPTIONAL["mac"]
_FORWARD_FIELDS = {"network_name": str, "protocol": str, "external_port": "u16",
                   "internal_port": "u16", "interface": str}
_RANGES = {"u16": (0, 2**16 - 1), "u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1), "i32": (-2**31, 2**31 - 1)}


def _check(value, kind, where):
    """Returns value checked against kind (a type, an integer range name, a list of one
    kind, or a dict of required fields; unknown fields are dropped)."""
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise InvalidReply(message="%s is not an object" % where)
        out = {}
        for key, k in kind.items():
            if key not in value:
                raise InvalidReply(message="%s lacks %r" % (where, key))
            out[key] = _check(value[key], k, "%s.%s" % (where, key))
        return out
    if isinstance(kind, list):
        if not isinstance(value, list):
            raise InvalidReply(message="%s is not an array" % where)
        return [_check(v, kind[0], "%s[%d]" % (where, i)) for i, v in enumerate(value)]
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidReply(message="%s is not a number" % where)
        return float(value)
    if kind in _RANGES:
        lo, hi = _RANGES[kind]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidReply(message="%s is not an integer in [%d, %d]" % (where, lo, hi))
        return value
    if not isinstance(value, kind):
        raise InvalidReply(message="%s is not a %s" % (where, kind.__name__))
    return value


def _optional(value, out, kinds, where):
    """Adds each optional field of kinds to out: None when absent or null."""
    for key, kind in kinds.items():
        v = value.get(key)
        out[key] = None if v is None else _check(v, kind, "%s.%s" % (where, key))
    return out


def _truncated(value, out, where):
    t = value.get("truncated", False)
    if not isinstance(t, bool):
        raise InvalidReply(message="%s.truncated is not a boolean" % where)
    out["truncated"] = t
    return out


def _parse_list(value):
    out = _check(value, {"networks": [_SUMMARY_FIELDS]}, "list")
    for i, net in enumerate(value["networks"]):
        _optional(net, out["networks"][i], {"removal_in_seconds": float},
                  "list.networks[%d]" % i)
    return _truncated(value, out, "list")


def _parse_show(value):
    out = _check(value, _DETAIL_FIELDS, "show")
    if not all(isinstance(v, str) for v in out["platform"].values()):
        raise InvalidReply(message="show.platform has a value that is not a string")
    for i, tap in enumerate(value["taps"]):
        _optional(tap, out["taps"][i], _TAP_OPTIONAL, "show.taps[%d]" % i)
    _optional(value, out, _DETAIL_OPTIONAL, "show")
    return _truncated(value, out, "show")


def _parse_forward(value):
    out = _check(value, _FORWARD_FIELDS, "forward")
    return _optional(value, out, {"internal_address": str}, "forward")


def _parse_leases(value):
    out = _check(value, {"leases": [_LEASE_FIELDS]}, "leases")
    for i, lease in enumerate(value["leases"]):
        _optional(lease, out["leases"][i], _LEASE_OPTIONAL, "leases.leases[%d]" % i)
    return _truncated(value, out, "leases")


def parse_reply(data):
    """Parses a reply into ("network", dict), ("status", dict), ("list", dict),
    ("show", dict), ("leases", dict), ("metrics", str) or ("error", BrokerError).
    Unknown fields are dropped; anything malformed raises InvalidReply."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidReply(message="reply is not valid JSON: %s" % e) from None
    if not isinstance(obj, dict):
        raise InvalidReply(message="reply is not a JSON object")
    if "error" in obj:
        code = obj["error"]
        if isinstance(code, bool) or not isinstance(code, int) or not -2**63 <= code < 2**63:
            raise InvalidReply(message='"error" is not an integer')
        message = obj.get("message")
        if not isinstance(message, str):
            message = strerror(code)
        return "error", BrokerError(code, message)
    if "network" in obj:
        return "network", _check(obj["network"], _INFO_FIELDS, "network")
    if "status" in obj:
        status = obj["status"]
        out = _check(status, _STATUS_FIELDS, "status")
        for i, net in enumerate(status["networks"]):
            removal = net.get("removal_in_seconds")
            out["networks"][i]["removal_in_seconds"] = (
                None if removal is None
                else _check(removal, float, "status.networks[%d].removal_in_seconds" % i))
        return "status", out
    for kind, parse in (("list", _parse_list), ("show", _parse_show),
                        ("leases", _parse_leases), ("forward", _parse_forward)):
        if kind in obj:
            if not isinstance(obj[kind], dict):
                raise InvalidReply(message="%s is not an object" % kind)
            return kind, parse(obj[kind])
    if "metrics" in obj:
        return "metrics", _check(obj["metrics"], str, "metrics")
    raise InvalidReply(
        message='reply has none of "network", "status", "list", "show", "leases", "forward", '
                '"metrics" or "error"')


class Network:
    """An acquired network: ``fd`` is the TAP device, ``info`` the broker's description,
    whose fields are also attributes (``name``, ``mode``, ``subnet``, ``gateway``,
    ``mask``, ``mtu``, ``bridge``, ``interface``, ``mac``).

    ``close()`` closes the fd and, for a Network from :func:`acquire_network`, its broker
    connection, which releases the network. Usable as a context manager."""

    def __init__(self, info, fd, owner=None):
        self.info = info
        self.fd = fd
        self._owner = owner

    def __getattr__(self, name):
        try:
            return self.__dict__["info"][name]
        except KeyError:
            raise AttributeError(name) from None

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._owner is not None:
            self._owner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "Network(%r, fd=%r)" % (self.info, self.fd)


def _recv_fds(sock, max_fds):
    """One message and its SCM_RIGHTS fds. Not socket.recv_fds: it drops its flags
    argument (so MSG_CMSG_CLOEXEC), and received fds must not leak into children."""
    item = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(max_fds * item.itemsize), _MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            item.frombytes(payload[:len(payload) - len(payload) % item.itemsize])
    return data, list(item), flags


class Client:
    """One connection to the broker; closing it releases everything acquired on it.
    Usable as a context manager; safe to share between threads."""

    _MAX_FDS = 4  # the protocol sends at most one; room for strays so they can be closed

    def __init__(self, path=None):
        self.path = path or socket_path()
        self._lock = threading.Lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
                why = "broker not running at %s" % self.path
            elif isinstance(e, PermissionError):
                why = "permission denied connecting to %s" % self.path
            else:
                why = "cannot connect to the broker at %s" % self.path
            raise BrokerUnreachable(message="%s: %s" % (why, e.strerror or e)) from e
        self._sock = sock

    def close(self):
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def acquire(self, name, mac=None):
        """A new TAP on network ``name``; ``mac`` asks for a guest MAC to keep."""
        kind, value, fds = self._call(encode_acquire(name, mac))
        if kind == "network" and len(fds) == 1:
            return Network(value, fds[0])
        for fd in fds:
            os.close(fd)
        if kind == "error":
            raise value
        if kind == "network":
            raise InvalidReply(message="network reply carried %d fds, want 1" % len(fds))
        raise InvalidReply(message="unexpected %s reply to acquire" % kind)

    def status(self):
        """The broker's status as a dict (see docs/protocol.md)."""
        kind, value, fds = self._call(encode_status())
        for fd in fds:
            os.close(fd)
        if kind == "error":
            raise value
        if kind != "status":
            raise InvalidReply(message="unexpected %s reply to status" % kind)
        return value

    def _ask(self, request, kind):
        kind_got, value, fds = self._call(request)
        for fd in fds:
            os.close(fd)
        if kind_got == "error":
            raise value
        if kind_got != kind:
            raise InvalidReply(message="unexpected %s reply to %s" % (kind_got, kind))
        return value

    def list(self):
        """Every network the broker knows that this caller may use (docs/protocol.md)."""
        return self._ask(encode_list(), "list")

    def show(self, name):
        """One network in detail: configuration, addresses, TAPs and their holders."""
        return self._ask(encode_show(name), "show")

    def leases(self, name=None):
        """The DHCP leases of ``name``, or of every network this caller may use."""
        return self._ask(encode_leases(name), "leases")

    def forward(self, network, protocol, external_port, internal_port, interface):
        """Forwards the host's ``external_port`` to ``internal_port`` of the guest behind
        this connection's TAP ``interface`` (an acquire's ``interface``) on ``network``,
        until this connection or the TAP closes. ``protocol`` is "tcp" or "udp". Ports
        below 1024 need root; a taken port raises PortInUse."""
        return self._ask(encode_forward(network, protocol, external_port, internal_port,
                                        interface), "forward")

    def metrics(self):
        """The broker's metrics as OpenMetrics text (ends with ``# EOF``)."""
        return self._ask(encode_metrics(), "metrics")

    def _call(self, request):
        with self._lock:
            if self._sock is None:
                raise BrokerUnreachable(message="client is closed")
            try:
                self._sock.sendall(request)
                data, fds, flags = _recv_fds(self._sock, self._MAX_FDS)
            except OSError as e:
                raise BrokerUnreachable(
                    message="connection to the broker at %s failed: %s" % (self.path, e)) from e
        try:
            if not data:
                raise BrokerUnreachable(
                    message="the broker at %s closed the connection" % self.path)
            if flags & socket.MSG_TRUNC:
                raise InvalidReply(message="reply is larger than %d bytes" % MAX_MESSAGE)
            if flags & socket.MSG_CTRUNC:
                raise InvalidReply(message="reply carried more than %d fds" % self._MAX_FDS)
            kind, value = parse_reply(data)
        except BrokerError:
            for fd in fds:
                os.close(fd)
            raise
        return kind, value, fds


def acquire_network(name, socket_path=None, mac=None):
    """Connects (``socket_path``, else $VMNET_BROKER_SOCKET, else the default) and
    acquires ``name`` on a connection of its own, closed with the returned Network."""
    client = Client(socket_path)
    try:
        net = client.acquire(name, mac)
    except BaseException:
        client.close()
        raise
    net._owner = client
    return net
