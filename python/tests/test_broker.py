"""Tests against the real broker (`vmnet-broker serve`), run as root in a network
namespace created and deleted here. The socket is in the filesystem, so the clients run
in the host namespace, as root and (through setpriv) as nobody."""

import fcntl
import ipaddress
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import vmnet_broker as vb

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(PACKAGE_DIR)
_counter = itertools.count(1)


def broker_binary():
    """$VMNET_BROKER_BIN, $CARGO_TARGET_DIR/debug or the repository's target/debug.
    Fails (saying what to do) when no candidate has `serve`: a test that cannot run must
    not pass."""
    candidates = [os.environ.get("VMNET_BROKER_BIN")]
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "debug", "vmnet-broker"))
    candidates.append(os.path.join(REPO, "target", "debug", "vmnet-broker"))
    candidates = [c for c in candidates if c]
    for c in candidates:
        if not os.path.exists(c):
            continue
        help = subprocess.run([c, "serve", "--help"], capture_output=True, text=True)
        text = help.stdout + help.stderr
        if help.returncode != 0 or "--idle-timeout" not in text:
            pytest.fail("broker %s has no `serve --idle-timeout`: build it with `cargo build`" % c)
        return os.path.abspath(c), "--state-dir" in text
    pytest.fail("no broker binary (looked at %s): build it with `cargo build`" % ", ".join(candidates))


class Broker:
    def __init__(self, idle_timeout):
        self.bin, has_state_dir = broker_binary()
        if os.geteuid() != 0:
            pytest.fail("the real-broker tests need root (network namespace, bridges, TAPs): "
                        "run them as root, e.g. `sudo scripts/test`")
        self.ns = "vmnbt-py-%d-%d" % (os.getpid(), next(_counter))
        self.dir = tempfile.mkdtemp(prefix="vmnbt-py-")
        os.chmod(self.dir, 0o755)  # nobody must reach the socket
        self.proc = None
        self.netns = False
        try:
            conf = os.path.join(self.dir, "conf")
            os.mkdir(conf)
            files = {"private.json": {"mode": "host", "allowed_users": ["root-never-matches"]}}
            files.update(("n%d.json" % i, {"mode": "host"}) for i in range(1, 8))
            for name, body in files.items():
                with open(os.path.join(conf, name), "w") as f:
                    json.dump(body, f)
            subprocess.run(["ip", "netns", "add", self.ns], check=True)
            self.netns = True
            self.socket = os.path.join(self.dir, "broker.sock")
            self.log = os.path.join(self.dir, "broker.log")
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns, self.bin, "serve", "--socket", self.socket,
                     "--config-dir", conf, "--idle-timeout", str(idle_timeout)]
                    # keep DHCP leases out of the host's /var/lib
                    + (["--state-dir", os.path.join(self.dir, "state")] if has_state_dir else []),
                    stdout=log, stderr=log)
            deadline = time.monotonic() + 15
            while not os.path.exists(self.socket):
                if self.proc.poll() is not None:
                    raise RuntimeError("broker exited (%s) before listening:\n%s"
                                       % (self.proc.returncode, self.read_log()))
                if time.monotonic() > deadline:
                    raise RuntimeError("broker did not create its socket within 15 s")
                time.sleep(0.02)
            os.chmod(self.socket, 0o666)
        except BaseException:
            self.stop()
            raise

    def read_log(self):
        with open(self.log) as f:
            return f.read()

    def wait_no_clients(self, timeout=10):
        """Waits until the broker has seen every client it accepted disconnect: it ignores
        SIGTERM while clients are connected, and handles a disconnect asynchronously (a
        status query to check would be a client too), so its log is the race-free witness."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.read_log()
            if log.count("client connected") == log.count("client disconnected"):
                return
            if time.monotonic() > deadline:
                raise AssertionError("clients still connected after %d s:\n%s" % (timeout, log))
            time.sleep(0.02)

    def stop(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.wait_no_clients()
                finally:
                    self.proc.send_signal(signal.SIGTERM)  # no clients left: it must exit
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError("broker ignored SIGTERM with no clients")
        finally:
            if self.netns:
                subprocess.run(["ip", "netns", "del", self.ns])
            shutil.rmtree(self.dir, ignore_errors=True)

    def ip(self, *args):
        return subprocess.run(["ip", "-n", self.ns] + list(args), capture_output=True, text=True)


@pytest.fixture(scope="module")
def broker():
    b = Broker(idle_timeout=2)
    yield b
    b.stop()


def tap_name(fd):
    """The interface a TAP fd is bound to, from the kernel (TUNGETIFF)."""
    assert stat.S_ISCHR(os.fstat(fd).st_mode)
    ifr = fcntl.ioctl(fd, 0x800454D2, b"\0" * 40)
    return ifr[:16].split(b"\0", 1)[0].decode()


def check_info(broker, net, name, mode):
    assert (net.name, net.mode) == (name, mode)
    subnet = ipaddress.ip_network(net.subnet)  # strict: host bits must be zero
    gateway = ipaddress.ip_address(net.gateway)
    assert gateway in subnet and gateway != subnet.network_address
    assert net.mask == str(subnet.netmask)
    assert 576 <= net.mtu <= 65535
    first = int(net.mac.split(":")[0], 16)
    assert len(net.mac.split(":")) == 6 and first & 1 == 0
    assert tap_name(net.fd) == net.interface
    link = broker.ip("-o", "link", "show", "dev", net.interface).stdout
    assert "master %s " % net.bridge in link, link


def network_status(client, name):
    for n in client.status()["networks"]:
        if n["name"] == name:
            return n
    return None


def test_acquire_shared_and_host(broker):
    with vb.Client(broker.socket) as c:
        with c.acquire("shared") as shared, c.acquire("host") as host:
            check_info(broker, shared, "shared", "shared")
            check_info(broker, host, "host", "host")
            assert shared.subnet != host.subnet and shared.bridge != host.bridge
            st = c.status()
            assert st["protocol"] == vb.PROTOCOL_VERSION
            ns = network_status(c, "shared")
            assert ns["clients"] == 1 and ns["subnet"] == shared.subnet
            assert shared.interface in ns["taps"]


def test_list_show_and_leases(broker):
    with vb.Client(broker.socket) as c:
        with c.acquire("host", mac="52:54:00:0a:0b:0c") as host:
            nets = {n["name"]: n for n in c.list()["networks"]}
            assert nets["host"]["state"] == "active"
            assert (nets["host"]["clients"], nets["host"]["taps"]) == (1, 1)
            # The IPv4 subnet, then the network's IPv6 /64 (on a kernel with IPv6).
            assert nets["host"]["subnets"][0] == host.subnet
            assert len(nets["host"]["subnets"]) in (1, 2)
            assert all(p.endswith("::/64") for p in nets["host"]["subnets"][1:])
            assert nets["host"]["removal_in_seconds"] is None
            d = c.show("host")
            assert (d["bridge"], d["subnet"], d["forwards"]) == (host.bridge, host.subnet, [])
            [tap] = d["taps"]
            assert (tap["interface"], tap["mac"], tap["pid"]) == (
                host.interface, "52:54:00:0a:0b:0c", os.getpid())
            # No DHCP client ran on the TAP: no leases, but a well-formed answer.
            assert c.leases("host") == {"leases": [], "truncated": False}
            with pytest.raises(vb.NotFound):
                c.show("no-such-network")


def test_requested_mac(broker):
    with vb.Client(broker.socket) as c1, vb.Client(broker.socket) as c2:
        with c1.acquire("shared", mac="52-54-00-AA-BB-CC") as net:
            assert net.mac == "52:54:00:aa:bb:cc"
            with pytest.raises(vb.InvalidRequest, match="in use"):
                c2.acquire("shared", mac="52:54:00:aa:bb:cc")


def test_errors_keep_the_connection(broker):
    with vb.Client(broker.socket) as c:
        with pytest.raises(vb.NotFound, match="no-such-network") as e:
            c.acquire("no-such-network")
        assert e.value.code == vb.NOT_FOUND
        with pytest.raises(vb.InvalidRequest):
            c.acquire("a b")
        with pytest.raises(vb.InvalidRequest):
            c.acquire("shared", mac="01:00:5e:00:00:01")
        assert c.status()["protocol"] == 1


def test_ninth_network_is_refused(broker):
    with vb.Client(broker.socket) as c:
        for name in ["shared", "host", "n1", "n2", "n3", "n4", "n5", "n6"]:
            c.acquire(name).close()
        with pytest.raises(vb.InternalError) as e:
            c.acquire("n7")
        assert e.value.code == vb.INTERNAL_ERROR
        c.acquire("shared").close()  # held already: does not count again


def test_close_releases_and_idle_network_goes_away(broker):
    net = vb.acquire_network("n7", socket_path=broker.socket)
    iface = net.interface
    with vb.Client(broker.socket) as observer:
        assert network_status(observer, "n7")["clients"] == 1
        net.close()
        deadline = time.monotonic() + 5
        while True:
            ns = network_status(observer, "n7")
            if ns is None:
                break
            assert ns["clients"] > 0 or ns["removal_in_seconds"] is not None, ns
            assert time.monotonic() < deadline, "n7 still there 5 s after release: %s" % ns
            time.sleep(0.1)
    assert broker.ip("link", "show", "dev", iface).returncode != 0, "TAP survived release"


UNPRIVILEGED = r"""
import json, sys, fcntl
sys.path.insert(0, sys.argv[1])
import vmnet_broker as vb
out = {}
for name in ("private", "shared"):
    try:
        with vb.acquire_network(name) as net:
            ifr = fcntl.ioctl(net.fd, 0x800454D2, b"\0" * 40)
            assert ifr[:16].split(b"\0", 1)[0].decode() == net.interface
            out[name] = 0
    except vb.BrokerError as e:
        out[name] = e.code
        print(name, e, file=sys.stderr)
print(json.dumps(out))
"""


def world_usable_python():
    """nobody cannot run an interpreter under /root (pyenv); fall back to Debian's."""
    path = os.path.realpath(sys.executable)
    d = os.path.dirname(path)
    while d != "/":
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return "/usr/bin/python3"
        d = os.path.dirname(d)
    return path


def test_unprivileged_client(broker):
    # The package must be readable by nobody: copy it next to the socket.
    pkg = os.path.join(broker.dir, "py")
    if not os.path.exists(pkg):
        shutil.copytree(os.path.join(PACKAGE_DIR, "vmnet_broker"), os.path.join(pkg, "vmnet_broker"))
        for root, dirs, files in os.walk(pkg):
            os.chmod(root, 0o755)
    env = dict(os.environ, VMNET_BROKER_SOCKET=broker.socket, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         world_usable_python(), "-c", UNPRIVILEGED, pkg],
        capture_output=True, text=True, env=env, cwd=broker.dir)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"private": vb.NOT_ALLOWED, "shared": 0}, r.stderr
