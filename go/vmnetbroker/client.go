// Package vmnetbroker is the Go client of vmnet-broker (docs/protocol.md): it asks the
// broker for a named network and receives a TAP device attached to it.
//
// The broker connection is the lease: everything acquired on a Client is released when
// the Client is closed (or the process exits). Keep it open while the VM runs.
package vmnetbroker

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
)

const (
	// DefaultSocketPath is where the broker listens unless configured otherwise.
	DefaultSocketPath = "/run/vmnet-broker/vmnet-broker.sock"
	// SocketEnv names the environment variable that overrides DefaultSocketPath.
	SocketEnv = "VMNET_BROKER_SOCKET"
)

// SocketPath returns $VMNET_BROKER_SOCKET when set and non-empty, else DefaultSocketPath.
func SocketPath() string {
	if p := os.Getenv(SocketEnv); p != "" {
		return p
	}
	return DefaultSocketPath
}

// Client is one connection to the broker. Its methods may be called from several
// goroutines; requests are sent one at a time.
type Client struct {
	path string
	mu   sync.Mutex
	conn *net.UnixConn
}

// Connect opens a connection to the broker at path ("" means SocketPath()).
func Connect(path string) (*Client, error) {
	if path == "" {
		path = SocketPath()
	}
	conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		msg := fmt.Sprintf("cannot connect to the broker at %s", path)
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			msg = fmt.Sprintf("broker not running at %s", path)
		}
		return nil, &Error{Code: BrokerUnreachable, Message: msg, Err: err}
	}
	return &Client{path: path, conn: conn}, nil
}

// Close closes the connection, which releases every network acquired on it.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn = nil
	return err
}

// Path is the socket path the client connected to.
func (c *Client) Path() string { return c.path }

// Network is an acquired network: its description and the TAP device.
type Network struct {
	Info
	// File is the TAP device (an open /dev/net/tun bound to Info.Interface). Pass it to
	// the VM, e.g. in exec.Cmd.ExtraFiles for QEMU's "-netdev tap,fd=N".
	File *os.File
	// owner is the connection this Network alone holds (AcquireNetwork), closed with it.
	owner *Client
}

// Close closes File and, for a Network from AcquireNetwork, its broker connection,
// which releases the network. A Network from Client.Acquire stays held until the
// Client is closed.
func (n *Network) Close() error {
	var err error
	if n.File != nil {
		err = n.File.Close()
	}
	if n.owner != nil {
		if e := n.owner.Close(); err == nil {
			err = e
		}
	}
	return err
}

// AcquireNetwork connects to the broker at SocketPath() and acquires the network
// name on a connection of its own; Close on the result releases it.
func AcquireNetwork(name string) (*Network, error) {
	c, err := Connect("")
	if err != nil {
		return nil, err
	}
	n, err := c.Acquire(name)
	if err != nil {
		c.Close()
		return nil, err
	}
	n.owner = c
	return n, nil
}

// Acquire asks for a new TAP on network name; the broker suggests the guest MAC.
func (c *Client) Acquire(name string) (*Network, error) {
	return c.acquire(name, nil)
}

// AcquireWithMAC asks for a new TAP on network name for a guest that keeps the MAC it
// had before (and so its DHCP lease). The MAC must be a 6-byte unicast address not in
// use on the network.
func (c *Client) AcquireWithMAC(name string, mac net.HardwareAddr) (*Network, error) {
	if len(mac) != 6 {
		return nil, &Error{Code: InvalidRequest, Message: fmt.Sprintf("mac %q is not a 6-byte MAC address", mac.String())}
	}
	return c.acquire(name, mac)
}

func acquireRequest(name string, mac net.HardwareAddr) []byte {
	req := map[string]string{"command": "acquire", "network_name": name}
	if mac != nil {
		req["mac"] = mac.String() // lowercase, colon-separated: the canonical form
	}
	return encodeRequest(req)
}

func statusRequest() []byte { return encodeRequest(map[string]string{"command": "status"}) }

func listRequest() []byte { return encodeRequest(map[string]string{"command": "list"}) }

func showRequest(name string) []byte {
	return encodeRequest(map[string]string{"command": "show", "network_name": name})
}

// forwardRequest asks for a port forward to the guest behind the caller's TAP iface.
func forwardRequest(network, protocol string, external, internal uint16, iface string) []byte {
	return encodeRequest(map[string]interface{}{
		"command":       "forward",
		"network_name":  network,
		"protocol":      protocol,
		"external_port": external,
		"internal_port": internal,
		"interface":     iface,
	})
}

// metricsRequest asks for the broker's OpenMetrics text.
func metricsRequest() []byte {
	return encodeRequest(map[string]string{"command": "metrics"})
}

// leasesRequest asks for the leases of name, or of every network when name is "".
func leasesRequest(name string) []byte {
	req := map[string]string{"command": "leases"}
	if name != "" {
		req["network_name"] = name
	}
	return encodeRequest(req)
}

func (c *Client) acquire(name string, mac net.HardwareAddr) (*Network, error) {
	r, fds, err := c.roundTrip(acquireRequest(name, mac))
	if err != nil {
		return nil, err
	}
	if r.network == nil || len(fds) != 1 {
		closeAll(fds)
		if r.err != nil {
			return nil, r.err
		}
		if r.network != nil {
			return nil, invalidReply("network reply carried %d file descriptors, want 1", len(fds))
		}
		return nil, invalidReply("unexpected reply to acquire")
	}
	syscall.CloseOnExec(fds[0])
	return &Network{Info: *r.network, File: os.NewFile(uintptr(fds[0]), "tap:"+r.network.Interface)}, nil
}

// Status asks the broker for its networks and clients.
func (c *Client) Status() (*Status, error) {
	r, fds, err := c.roundTrip(statusRequest())
	closeAll(fds)
	if err != nil {
		return nil, err
	}
	if r.err != nil {
		return nil, r.err
	}
	if r.status == nil {
		return nil, invalidReply("unexpected reply to status")
	}
	return r.status, nil
}

// ask sends a request whose reply carries no fd and returns the parsed reply.
func (c *Client) ask(request []byte) (*reply, error) {
	r, fds, err := c.roundTrip(request)
	closeAll(fds)
	if err != nil {
		return nil, err
	}
	if r.err != nil {
		return nil, r.err
	}
	return r, nil
}

// List asks for every network the broker knows that the caller may use.
func (c *Client) List() (*NetworkList, error) {
	r, err := c.ask(listRequest())
	if err != nil {
		return nil, err
	}
	if r.list == nil {
		return nil, invalidReply("unexpected reply to list")
	}
	return r.list, nil
}

// Show asks for one network in detail: configuration, addresses, TAPs and holders.
func (c *Client) Show(name string) (*NetworkDetail, error) {
	r, err := c.ask(showRequest(name))
	if err != nil {
		return nil, err
	}
	if r.show == nil {
		return nil, invalidReply("unexpected reply to show")
	}
	return r.show, nil
}

// Leases asks for the DHCP leases of network name, or of every network the caller
// may use when name is "".
func (c *Client) Leases(name string) (*LeaseList, error) {
	r, err := c.ask(leasesRequest(name))
	if err != nil {
		return nil, err
	}
	if r.leases == nil {
		return nil, invalidReply("unexpected reply to leases")
	}
	return r.leases, nil
}

// Forward forwards the host's port external to port internal of the guest behind this
// connection's TAP iface on network (an acquire's Info.Interface), until this
// connection closes or the TAP does. protocol is "tcp" or "udp". Ports below 1024 need
// root; a taken port fails with ErrPortInUse.
func (c *Client) Forward(network, protocol string, external, internal uint16, iface string) (*Forward, error) {
	r, err := c.ask(forwardRequest(network, protocol, external, internal, iface))
	if err != nil {
		return nil, err
	}
	if r.forward == nil {
		return nil, invalidReply("unexpected reply to forward")
	}
	return r.forward, nil
}

// Metrics asks for the broker's metrics as OpenMetrics text (ending with "# EOF").
func (c *Client) Metrics() (string, error) {
	r, err := c.ask(metricsRequest())
	if err != nil {
		return "", err
	}
	if r.metrics == nil {
		return "", invalidReply("unexpected reply to metrics")
	}
	return *r.metrics, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}

// maxFds bounds the descriptors accepted with one reply; the protocol sends at most one,
// the room for more lets us close strays instead of losing them to MSG_CTRUNC.
const maxFds = 4

// roundTrip sends one request and reads its reply with any descriptors attached.
func (c *Client) roundTrip(req []byte) (*reply, []int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil, nil, &Error{Code: BrokerUnreachable, Message: "client is closed"}
	}
	broken := func(what string, err error) error {
		return &Error{Code: BrokerUnreachable, Message: fmt.Sprintf("%s the broker at %s", what, c.path), Err: err}
	}
	if _, err := c.conn.Write(req); err != nil {
		return nil, nil, broken("cannot send to", err)
	}
	buf := make([]byte, MaxMessage)
	oob := make([]byte, syscall.CmsgSpace(maxFds*4))
	n, oobn, flags, _, err := c.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, broken("cannot read from", err)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, invalidReply("bad control message: %v", err)
		}
		for i := range msgs {
			if got, err := syscall.ParseUnixRights(&msgs[i]); err == nil {
				fds = append(fds, got...)
			}
		}
	}
	switch {
	case n == 0:
		closeAll(fds)
		return nil, nil, broken("connection closed by", nil)
	case flags&syscall.MSG_TRUNC != 0:
		closeAll(fds)
		return nil, nil, invalidReply("reply is larger than %d bytes", MaxMessage)
	case flags&syscall.MSG_CTRUNC != 0:
		closeAll(fds)
		return nil, nil, invalidReply("reply carried more than %d file descriptors", maxFds)
	}
	r, perr := parseReply(buf[:n])
	if perr != nil {
		closeAll(fds)
		return nil, nil, perr
	}
	return r, fds, nil
}
