package vmnetbroker

import (
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestBrokerNotRunning(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.sock")
	_, err := Connect(path)
	if !errors.Is(err, ErrBrokerUnreachable) {
		t.Fatalf("want ErrBrokerUnreachable, got %v", err)
	}
	if !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("the cause is lost: %v", err)
	}
	if want := "broker not running at " + path; !strings.Contains(err.Error(), want) {
		t.Fatalf("%q does not say %q", err, want)
	}

	t.Setenv(SocketEnv, path)
	if SocketPath() != path {
		t.Fatalf("SocketPath ignores $%s", SocketEnv)
	}
	if _, err := AcquireNetwork("shared"); !errors.Is(err, ErrBrokerUnreachable) ||
		!strings.Contains(err.Error(), path) {
		t.Fatalf("AcquireNetwork: %v", err)
	}
	t.Setenv(SocketEnv, "")
	if SocketPath() != DefaultSocketPath {
		t.Fatal("an empty $VMNET_BROKER_SOCKET must mean the default path")
	}
}

// A socket file nobody listens on (a crashed broker leaves one) is "not running" too.
func TestStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stale.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	_, err = Connect(path)
	if !errors.Is(err, ErrBrokerUnreachable) || !errors.Is(err, syscall.ECONNREFUSED) ||
		!strings.Contains(err.Error(), "broker not running at "+path) {
		t.Fatalf("got %v", err)
	}
}
