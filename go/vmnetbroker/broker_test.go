package vmnetbroker

// Tests against the real broker (target/debug/vmnet-broker serve) running as root in a
// network namespace this test creates and deletes. The socket lives in the filesystem,
// so the client side runs in the host namespace, both as root and as nobody.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

var nsCounter int32

type realBroker struct {
	ns, dir, socket string
	cmd             *exec.Cmd
	log             string
}

// brokerBinary finds the broker: $VMNET_BROKER_BIN, $CARGO_TARGET_DIR/debug or the
// repository's target/debug. The tests fail (saying what to do) when none has `serve`:
// a test that cannot run must not pass.
func brokerBinary(t *testing.T) (string, bool) {
	var candidates []string
	if p := os.Getenv("VMNET_BROKER_BIN"); p != "" {
		candidates = append(candidates, p)
	}
	if d := os.Getenv("CARGO_TARGET_DIR"); d != "" {
		candidates = append(candidates, filepath.Join(d, "debug", "vmnet-broker"))
	}
	candidates = append(candidates, filepath.Join("..", "..", "target", "debug", "vmnet-broker"))
	for _, c := range candidates {
		if _, err := os.Stat(c); err != nil {
			continue
		}
		help, err := exec.Command(c, "serve", "--help").CombinedOutput()
		if err != nil || !strings.Contains(string(help), "--idle-timeout") {
			t.Fatalf("broker %s has no `serve --idle-timeout` (%v): build it with `cargo build`", c, err)
		}
		abs, _ := filepath.Abs(c)
		return abs, strings.Contains(string(help), "--state-dir")
	}
	t.Fatalf("no broker binary (looked at %s): build it with `cargo build`", strings.Join(candidates, ", "))
	return "", false
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func startBroker(t *testing.T, idleTimeout string) *realBroker {
	bin, hasStateDir := brokerBinary(t)
	if os.Geteuid() != 0 {
		t.Fatal("the real-broker tests need root (network namespace, bridges, TAPs): run them as root, e.g. `sudo scripts/test`")
	}
	b := &realBroker{ns: fmt.Sprintf("vmnbt-go-%d-%d", os.Getpid(), atomic.AddInt32(&nsCounter, 1))}
	dir, err := os.MkdirTemp("", "vmnbt-go-")
	if err != nil {
		t.Fatal(err)
	}
	b.dir = dir
	t.Cleanup(func() { os.RemoveAll(dir) })
	// nobody must reach the socket and the helper binary in here.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "conf")
	files := map[string]string{"private.json": `{"mode":"host","allowed_users":["root-never-matches"]}`}
	for i := 1; i <= 7; i++ {
		files[fmt.Sprintf("n%d.json", i)] = `{"mode":"host"}`
	}
	os.Mkdir(conf, 0o755)
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(conf, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	run(t, "ip", "netns", "add", b.ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", b.ns).Run() })

	b.socket = filepath.Join(dir, "broker.sock")
	b.log = filepath.Join(dir, "broker.log")
	logf, err := os.Create(b.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := []string{"netns", "exec", b.ns, bin, "serve",
		"--socket", b.socket, "--config-dir", conf, "--idle-timeout", idleTimeout}
	if hasStateDir { // keep DHCP leases out of the host's /var/lib
		args = append(args, "--state-dir", filepath.Join(dir, "state"))
	}
	b.cmd = exec.Command("ip", args...)
	b.cmd.Stdout, b.cmd.Stderr = logf, logf
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- b.cmd.Wait() }()
	// Registered after the netns deletion so it runs first: stop the broker, then drop
	// the namespace (and with it anything the broker failed to remove).
	t.Cleanup(func() {
		// The broker ignores SIGTERM while clients are connected and handles a disconnect
		// asynchronously (a status query to check would be a client too): wait until its
		// log shows every client it accepted gone.
		for deadline := time.Now().Add(10 * time.Second); ; {
			out, _ := os.ReadFile(b.log)
			log := string(out)
			if strings.Count(log, "client connected") == strings.Count(log, "client disconnected") {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("clients still connected after 10 s")
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		b.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			b.cmd.Process.Kill()
			<-exited
			t.Errorf("broker ignored SIGTERM with no clients")
		}
		if t.Failed() {
			out, _ := os.ReadFile(b.log)
			t.Logf("broker log:\n%s", out)
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := os.Stat(b.socket); err == nil {
			break
		}
		select {
		case err := <-exited:
			exited <- err
			out, _ := os.ReadFile(b.log)
			t.Fatalf("broker exited before listening: %v\n%s", err, out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("broker did not create its socket within 15 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := os.Chmod(b.socket, 0o666); err != nil {
		t.Fatal(err)
	}
	return b
}

// tapName asks the kernel which interface a TAP fd is bound to (TUNGETIFF).
func tapName(t *testing.T, f *os.File) string {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFCHR {
		t.Fatalf("fd is not a character device (stat %v, mode %o)", err, st.Mode)
	}
	var ifr [40]byte
	const tungetiff = 0x800454d2
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), tungetiff, uintptr(unsafe.Pointer(&ifr[0]))); e != 0 {
		t.Fatalf("TUNGETIFF: %v", e)
	}
	name := ifr[:16]
	if i := strings.IndexByte(string(name), 0); i >= 0 {
		name = name[:i]
	}
	return string(name)
}

func checkInfo(t *testing.T, b *realBroker, n *Network, name, mode string) {
	t.Helper()
	if n.Name != name || n.Mode != mode {
		t.Errorf("name/mode %q/%q, want %q/%q", n.Name, n.Mode, name, mode)
	}
	ip, subnet, err := net.ParseCIDR(n.Subnet)
	if err != nil || !ip.Equal(subnet.IP) {
		t.Errorf("subnet %q is not a network in CIDR notation", n.Subnet)
	} else {
		if gw := net.ParseIP(n.Gateway); gw == nil || !subnet.Contains(gw) || gw.Equal(subnet.IP) {
			t.Errorf("gateway %q is not a host of %s", n.Gateway, n.Subnet)
		}
		if m := net.IP(subnet.Mask).String(); m != n.Mask {
			t.Errorf("mask %q does not match subnet %s (%s)", n.Mask, n.Subnet, m)
		}
	}
	if n.MTU < 576 || n.MTU > 65535 {
		t.Errorf("mtu %d", n.MTU)
	}
	if mac, err := net.ParseMAC(n.MAC); err != nil || len(mac) != 6 || mac[0]&1 != 0 {
		t.Errorf("guest mac %q is not a unicast MAC", n.MAC)
	}
	if got := tapName(t, n.File); got != n.Interface {
		t.Errorf("fd is TAP %q, reply says %q", got, n.Interface)
	}
	link := run(t, "ip", "-n", b.ns, "-o", "link", "show", "dev", n.Interface)
	if !strings.Contains(link, "master "+n.Bridge+" ") {
		t.Errorf("%s is not attached to bridge %s: %s", n.Interface, n.Bridge, link)
	}
}

func statusNetwork(s *Status, name string) *NetworkStatus {
	for i := range s.Networks {
		if s.Networks[i].Name == name {
			return &s.Networks[i]
		}
	}
	return nil
}

func TestRealBroker(t *testing.T) {
	b := startBroker(t, "2")

	t.Run("acquire shared and host", func(t *testing.T) {
		c, err := Connect(b.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		shared, err := c.Acquire("shared")
		if err != nil {
			t.Fatal(err)
		}
		defer shared.Close()
		checkInfo(t, b, shared, "shared", "shared")
		host, err := c.Acquire("host")
		if err != nil {
			t.Fatal(err)
		}
		defer host.Close()
		checkInfo(t, b, host, "host", "host")
		if host.Subnet == shared.Subnet || host.Bridge == shared.Bridge {
			t.Errorf("shared and host share %s / %s", host.Subnet, host.Bridge)
		}
		st, err := c.Status()
		if err != nil {
			t.Fatal(err)
		}
		ns := statusNetwork(st, "shared")
		if st.Protocol != ProtocolVersion || ns == nil || ns.Clients != 1 || ns.Subnet != shared.Subnet {
			t.Fatalf("status does not show our lease: %+v", st)
		}
	})

	t.Run("list, show and leases", func(t *testing.T) {
		c, err := Connect(b.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		host, err := c.Acquire("host")
		if err != nil {
			t.Fatal(err)
		}
		defer host.Close()
		l, err := c.List()
		if err != nil {
			t.Fatal(err)
		}
		var found *NetworkSummary
		for i := range l.Networks {
			if l.Networks[i].Name == "host" {
				found = &l.Networks[i]
			}
		}
		// The IPv4 subnet, then the network's IPv6 /64 (on a kernel with IPv6).
		if found == nil || found.State != "active" || found.Taps != 1 ||
			len(found.Subnets) < 1 || len(found.Subnets) > 2 || found.Subnets[0] != host.Subnet ||
			(len(found.Subnets) == 2 && !strings.HasSuffix(found.Subnets[1], "::/64")) {
			t.Fatalf("list does not show our network: %+v", l)
		}
		d, err := c.Show("host")
		if err != nil {
			t.Fatal(err)
		}
		if len(d.Taps) != 1 || d.Taps[0].Interface != host.Interface || d.Taps[0].PID == nil ||
			int(*d.Taps[0].PID) != os.Getpid() || d.Bridge == nil || *d.Bridge != host.Bridge {
			t.Fatalf("show does not show our TAP: %+v", d)
		}
		leases, err := c.Leases("host")
		if err != nil || len(leases.Leases) != 0 {
			t.Fatalf("leases of a network no DHCP client used: %+v, %v", leases, err)
		}
		if _, err := c.Show("no-such-network"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("show of an unknown network: %v", err)
		}
	})

	t.Run("requested MAC is honoured and exclusive", func(t *testing.T) {
		mac, _ := net.ParseMAC("52:54:00:12:34:56")
		c1, err := Connect(b.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c1.Close()
		n, err := c1.AcquireWithMAC("shared", mac)
		if err != nil {
			t.Fatal(err)
		}
		defer n.Close()
		if n.MAC != "52:54:00:12:34:56" {
			t.Fatalf("got mac %s", n.MAC)
		}
		c2, err := Connect(b.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Close()
		if _, err := c2.AcquireWithMAC("shared", mac); !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("second user of the MAC: %v", err)
		}
	})

	t.Run("errors", func(t *testing.T) {
		c, err := Connect(b.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, err = c.Acquire("no-such-network")
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "no-such-network") {
			t.Fatalf("unknown name: %v", err)
		}
		if _, err := c.Acquire("../etc/passwd"); !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("bad name: %v", err)
		}
		// A bad request does not cost the connection.
		if _, err := c.Status(); err != nil {
			t.Fatalf("connection unusable after a bad request: %v", err)
		}
	})

	t.Run("ninth distinct network is refused", func(t *testing.T) {
		c, err := Connect(b.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		names := []string{"shared", "host", "n1", "n2", "n3", "n4", "n5", "n6"}
		for _, name := range names {
			n, err := c.Acquire(name)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			n.File.Close()
		}
		if _, err := c.Acquire("n7"); !errors.Is(err, ErrInternalError) {
			t.Fatalf("9th network: %v", err)
		}
		n, err := c.Acquire("shared") // one it holds does not count again
		if err != nil {
			t.Fatalf("re-acquiring a held network: %v", err)
		}
		n.Close()
	})

	t.Run("closing releases, idle networks go away", func(t *testing.T) {
		n, err := func() (*Network, error) {
			t.Setenv(SocketEnv, b.socket)
			return AcquireNetwork("n7")
		}()
		if err != nil {
			t.Fatal(err)
		}
		iface := n.Interface
		observer, err := Connect(b.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer observer.Close()
		st, _ := observer.Status()
		if ns := statusNetwork(st, "n7"); ns == nil || ns.Clients != 1 {
			t.Fatalf("n7 not held: %+v", ns)
		}
		n.Close()
		deadline := time.Now().Add(5 * time.Second)
		for {
			st, err := observer.Status()
			if err != nil {
				t.Fatal(err)
			}
			ns := statusNetwork(st, "n7")
			if ns == nil {
				break // already removed after the 2 s idle timeout
			}
			if ns.Clients == 0 && ns.RemovalInSeconds == nil {
				t.Fatalf("released network has no removal scheduled: %+v", ns)
			}
			if time.Now().After(deadline) {
				t.Fatalf("n7 still there 5 s after release with a 2 s idle timeout: %+v", ns)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if out, err := exec.Command("ip", "-n", b.ns, "link", "show", "dev", iface).CombinedOutput(); err == nil {
			t.Fatalf("TAP %s survived its release: %s", iface, out)
		}
	})

	t.Run("unprivileged client", func(t *testing.T) {
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		helper := filepath.Join(b.dir, "vmnetbroker.test")
		copyFile(t, exe, helper)
		cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
			helper, "-test.run=^TestUnprivilegedHelper$", "-test.v")
		cmd.Dir = b.dir
		cmd.Env = append(os.Environ(), "VMNBT_GO_HELPER=1", SocketEnv+"="+b.socket)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helper as nobody failed: %v\n%s", err, out)
		}
		var results map[string]int64
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "RESULT ") {
				json.Unmarshal([]byte(line[7:]), &results)
			}
		}
		if results["private"] != int64(NotAllowed) || results["shared"] != int64(Success) {
			t.Fatalf("as nobody: private -> %d (want 3), shared -> %d (want 0)\n%s",
				results["private"], results["shared"], out)
		}
	})
}

func copyFile(t *testing.T, from, to string) {
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestUnprivilegedHelper is the client half of "unprivileged client", run by it as
// nobody; on its own it skips.
func TestUnprivilegedHelper(t *testing.T) {
	if os.Getenv("VMNBT_GO_HELPER") != "1" {
		t.Skip("helper process of TestRealBroker/unprivileged_client")
	}
	if os.Geteuid() == 0 {
		t.Fatal("helper runs as root; the test would prove nothing")
	}
	results := map[string]int64{}
	for _, name := range []string{"private", "shared"} {
		n, err := AcquireNetwork(name)
		var e *Error
		switch {
		case err == nil:
			if tapName(t, n.File) != n.Interface {
				t.Errorf("%s: fd is not the TAP of the reply", name)
			}
			n.Close()
			results[name] = int64(Success)
		case errors.As(err, &e):
			t.Logf("%s: %v", name, err)
			results[name] = int64(e.Code)
		default:
			t.Fatalf("%s: %v", name, err)
		}
	}
	out, _ := json.Marshal(results)
	fmt.Printf("RESULT %s\n", out)
}
