package vmnetbroker

import (
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
)

// peer gives a Client one end of a real SOCK_SEQPACKET socketpair; the test plays the
// broker on the other end, to send replies the real broker never sends.
func peer(t *testing.T) (*Client, int) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "client end")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	c := &Client{path: "socketpair", conn: conn.(*net.UnixConn)}
	t.Cleanup(func() { c.Close(); syscall.Close(fds[1]) })
	return c, fds[1]
}

// answer reads the request and answers with msg and the given fds.
func answer(t *testing.T, fd int, msg string, fds ...int) {
	buf := make([]byte, MaxMessage)
	if _, _, _, _, err := syscall.Recvmsg(fd, buf, nil, 0); err != nil {
		t.Error(err)
		return
	}
	var oob []byte
	if len(fds) > 0 {
		oob = syscall.UnixRights(fds...)
	}
	if err := syscall.Sendmsg(fd, []byte(msg), oob, nil, 0); err != nil {
		t.Error(err)
	}
}

func devNull(t *testing.T) (int, func() bool) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	return int(f.Fd()), func() bool { return f.Close() == nil }
}

func openFds(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

const netReply = `{"network":{"name":"n","mode":"host","subnet":"10.0.0.0/24","gateway":"10.0.0.1","mask":"255.255.255.0","mtu":1500,"bridge":"b","interface":"t0","mac":"52:00:00:00:00:01"}}`

func TestNetworkReplyWithoutFdIsInvalid(t *testing.T) {
	c, srv := peer(t)
	go answer(t, srv, netReply)
	if _, err := c.Acquire("n"); !errors.Is(err, ErrInvalidReply) {
		t.Fatalf("got %v", err)
	}
}

func TestFdsOfOtherRepliesAreClosed(t *testing.T) {
	c, srv := peer(t)
	fd, closeOwn := devNull(t)
	defer closeOwn()
	before := openFds(t)
	go answer(t, srv, `{"error":6,"message":"boom"}`, fd, fd)
	_, err := c.Acquire("n")
	if !errors.Is(err, ErrCreateFailure) || err.(*Error).Message != "boom" {
		t.Fatalf("got %v", err)
	}
	if after := openFds(t); after != before {
		t.Fatalf("stray descriptors leaked: %d open before, %d after", before, after)
	}
}

func TestNetworkReplyHandsOverTheFd(t *testing.T) {
	c, srv := peer(t)
	fd, closeOwn := devNull(t)
	defer closeOwn()
	go answer(t, srv, netReply, fd)
	n, err := c.Acquire("n")
	if err != nil {
		t.Fatal(err)
	}
	var a, b syscall.Stat_t
	if syscall.Fstat(int(n.File.Fd()), &a) != nil || syscall.Fstat(fd, &b) != nil || a.Rdev != b.Rdev || a.Ino != b.Ino {
		t.Fatal("received fd is not the one sent")
	}
	flags, _, _ := syscall.Syscall(syscall.SYS_FCNTL, n.File.Fd(), syscall.F_GETFD, 0)
	if flags&syscall.FD_CLOEXEC == 0 {
		t.Fatal("received fd would leak into child processes")
	}
	if n.Interface != "t0" || n.MTU != 1500 {
		t.Fatalf("info %+v", n.Info)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if c.conn == nil {
		t.Fatal("closing a Network from Client.Acquire must not close the client")
	}
}

func TestPeerClosingIsBrokerUnreachable(t *testing.T) {
	c, srv := peer(t)
	go func() {
		buf := make([]byte, 64)
		syscall.Read(srv, buf)
		syscall.Shutdown(srv, syscall.SHUT_RDWR)
	}()
	if _, err := c.Status(); !errors.Is(err, ErrBrokerUnreachable) {
		t.Fatalf("got %v", err)
	}
}
