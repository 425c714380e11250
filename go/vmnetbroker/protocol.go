package vmnetbroker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"unicode/utf8"
)

const (
	// ProtocolVersion is the version of docs/protocol.md this package speaks.
	ProtocolVersion = 1
	// MaxMessage is the largest message either side may send, in bytes.
	MaxMessage = 64 * 1024
)

// Info describes an acquired network (the "network" object of an acquire reply).
type Info struct {
	Name      string `json:"name"`
	Mode      string `json:"mode"`
	Subnet    string `json:"subnet"` // CIDR, e.g. "192.168.64.0/24"
	Gateway   string `json:"gateway"`
	Mask      string `json:"mask"`
	MTU       uint32 `json:"mtu"`
	Bridge    string `json:"bridge"`
	Interface string `json:"interface"` // the TAP of this acquire
	MAC       string `json:"mac"`       // the MAC the guest should use
}

// Status is the broker's answer to a status request.
type Status struct {
	Version            string          `json:"version"`
	Protocol           uint32          `json:"protocol"`
	PID                uint32          `json:"pid"`
	IdleTimeoutSeconds float64         `json:"idle_timeout_seconds"`
	Networks           []NetworkStatus `json:"networks"`
	Clients            []ClientStatus  `json:"clients"`
}

// NetworkStatus is one network in a Status.
type NetworkStatus struct {
	Name    string   `json:"name"`
	Mode    string   `json:"mode"`
	Subnet  string   `json:"subnet"`
	Gateway string   `json:"gateway"`
	Bridge  string   `json:"bridge"`
	MTU     uint32   `json:"mtu"`
	Clients uint64   `json:"clients"`
	Taps    []string `json:"taps"`
	// RemovalInSeconds is set while the network is idle and waiting for removal.
	RemovalInSeconds *float64 `json:"removal_in_seconds,omitempty"`
}

// ClientStatus is one connected client in a Status.
type ClientStatus struct {
	ID       uint64   `json:"id"`
	PID      int32    `json:"pid"`
	UID      uint32   `json:"uid"`
	GID      uint32   `json:"gid"`
	Networks []string `json:"networks"`
}

// NetworkList is the broker's answer to a list request: every network it knows that
// the caller may use.
type NetworkList struct {
	Networks  []NetworkSummary `json:"networks"`
	Truncated bool             `json:"truncated,omitempty"`
}

// NetworkSummary is one network in a NetworkList.
type NetworkSummary struct {
	Name    string   `json:"name"`
	Mode    string   `json:"mode"`
	Subnets []string `json:"subnets"`
	// State is "inactive", "active", "idle" or "removing".
	State string `json:"state"`
	// RemovalInSeconds is set while the network is idle.
	RemovalInSeconds *float64 `json:"removal_in_seconds,omitempty"`
	Clients          uint64   `json:"clients"`
	Taps             uint64   `json:"taps"`
}

// TapInfo is one TAP of a NetworkDetail, with the client that acquired it (nil once
// that connection closed).
type TapInfo struct {
	Interface string  `json:"interface"`
	MAC       *string `json:"mac"`
	UID       *uint32 `json:"uid"`
	Client    *uint64 `json:"client"`
	PID       *int32  `json:"pid"`
}

// NetworkDetail is the broker's answer to a show request.
type NetworkDetail struct {
	Name             string                 `json:"name"`
	Mode             string                 `json:"mode"`
	State            string                 `json:"state"`
	RemovalInSeconds *float64               `json:"removal_in_seconds,omitempty"`
	Config           map[string]interface{} `json:"config"`
	Subnet           *string                `json:"subnet"`
	Gateway          *string                `json:"gateway"`
	Mask             *string                `json:"mask"`
	MTU              uint32                 `json:"mtu"`
	Bridge           *string                `json:"bridge"`
	Platform         map[string]string      `json:"platform"`
	Clients          uint64                 `json:"clients"`
	Forwards         []interface{}          `json:"forwards"`
	Taps             []TapInfo              `json:"taps"`
	Truncated        bool                   `json:"truncated,omitempty"`
}

// LeaseList is the broker's answer to a leases request.
type LeaseList struct {
	Leases    []LeaseInfo `json:"leases"`
	Truncated bool        `json:"truncated,omitempty"`
}

// LeaseInfo is one DHCP lease, with the TAP and client behind its MAC when known.
type LeaseInfo struct {
	Network          string  `json:"network"`
	MAC              string  `json:"mac"`
	IPv4             string  `json:"ipv4"`
	IPv6             *string `json:"ipv6"`
	Hostname         *string `json:"hostname"`
	ExpiresAt        uint64  `json:"expires_at"`
	ExpiresInSeconds uint64  `json:"expires_in_seconds"`
	Interface        *string `json:"interface"`
	UID              *uint32 `json:"uid"`
	Client           *uint64 `json:"client"`
	PID              *int32  `json:"pid"`
}

// encodeRequest produces the canonical bytes of a request: compact JSON, keys in byte
// order (a map marshals sorted), no HTML escaping, so every client library sends the
// same bytes (tests/vectors/messages.json).
func encodeRequest(fields interface{}) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(fields); err != nil {
		panic("a map of strings and numbers always encodes: " + err.Error())
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// reply is a parsed broker reply: exactly one field is set.
type reply struct {
	network *Info
	status  *Status
	list    *NetworkList
	show    *NetworkDetail
	leases  *LeaseList
	forward *Forward
	metrics *string
	err     *Error
}

// Forward is the broker's answer to a forward request: the forward as made, and the
// guest's address when the broker knows it already (nil until the guest's DHCP lease).
type Forward struct {
	NetworkName     string  `json:"network_name"`
	Protocol        string  `json:"protocol"`
	ExternalPort    uint16  `json:"external_port"`
	InternalPort    uint16  `json:"internal_port"`
	Interface       string  `json:"interface"`
	InternalAddress *string `json:"internal_address"`
}

func invalidReply(format string, args ...interface{}) *Error {
	return &Error{Code: InvalidReply, Message: fmt.Sprintf(format, args...)}
}

// parseReply checks a reply strictly (every known field present with its type) and
// ignores unknown fields. Anything else is an InvalidReply error.
func parseReply(b []byte) (*reply, *Error) {
	// encoding/json would silently replace invalid UTF-8; the protocol forbids it.
	if !utf8.Valid(b) {
		return nil, invalidReply("reply is not valid UTF-8")
	}
	top, err := object(b)
	if err != nil {
		return nil, invalidReply("reply is not a JSON object: %v", err)
	}
	if raw, ok := top["error"]; ok {
		code, err := integer(raw, math.MinInt64, math.MaxInt64)
		if err != nil {
			return nil, invalidReply("\"error\" is not an integer")
		}
		e := &Error{Code: Code(code), Message: Strerror(Code(code))}
		var msg interface{}
		if raw, ok := top["message"]; ok && json.Unmarshal(raw, &msg) == nil {
			if s, ok := msg.(string); ok {
				e.Message = s
			}
		}
		return &reply{err: e}, nil
	}
	if raw, ok := top["network"]; ok {
		var info Info
		if err := decodeInfo(raw, &info); err != nil {
			return nil, invalidReply("malformed \"network\": %v", err)
		}
		return &reply{network: &info}, nil
	}
	if raw, ok := top["status"]; ok {
		var st Status
		if err := decodeStatus(raw, &st); err != nil {
			return nil, invalidReply("malformed \"status\": %v", err)
		}
		return &reply{status: &st}, nil
	}
	if raw, ok := top["list"]; ok {
		var l NetworkList
		if err := decodeList(raw, &l); err != nil {
			return nil, invalidReply("malformed \"list\": %v", err)
		}
		return &reply{list: &l}, nil
	}
	if raw, ok := top["show"]; ok {
		var d NetworkDetail
		if err := decodeDetail(raw, &d); err != nil {
			return nil, invalidReply("malformed \"show\": %v", err)
		}
		return &reply{show: &d}, nil
	}
	if raw, ok := top["leases"]; ok {
		var l LeaseList
		if err := decodeLeases(raw, &l); err != nil {
			return nil, invalidReply("malformed \"leases\": %v", err)
		}
		return &reply{leases: &l}, nil
	}
	if raw, ok := top["forward"]; ok {
		var fw Forward
		if err := decodeForward(raw, &fw); err != nil {
			return nil, invalidReply("malformed \"forward\": %v", err)
		}
		return &reply{forward: &fw}, nil
	}
	if raw, ok := top["metrics"]; ok {
		var m string
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, invalidReply("\"metrics\" is not a string")
		}
		return &reply{metrics: &m}, nil
	}
	return nil, invalidReply("reply has none of \"network\", \"status\", \"list\", \"show\", \"leases\", \"forward\", \"metrics\" or \"error\"")
}

type fields map[string]json.RawMessage

// object decodes a JSON object; null is not one.
func object(b []byte) (fields, error) {
	var f fields
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, err
	}
	if f == nil {
		return nil, fmt.Errorf("null")
	}
	return f, nil
}

func number(raw json.RawMessage) (json.Number, bool) {
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	var v interface{}
	if d.Decode(&v) != nil {
		return "", false
	}
	n, ok := v.(json.Number)
	return n, ok
}

// integer accepts only JSON integers (no fraction, no exponent) within [min, max].
func integer(raw json.RawMessage, min, max int64) (int64, error) {
	n, ok := number(raw)
	if !ok {
		return 0, fmt.Errorf("not a number")
	}
	i, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil || i < min || i > max {
		return 0, fmt.Errorf("%s is not an integer in [%d, %d]", n, min, max)
	}
	return i, nil
}

func unsigned(raw json.RawMessage, bits int) (uint64, error) {
	n, ok := number(raw)
	if !ok {
		return 0, fmt.Errorf("not a number")
	}
	u, err := strconv.ParseUint(string(n), 10, bits)
	if err != nil {
		return 0, fmt.Errorf("%s is not a %d-bit unsigned integer", n, bits)
	}
	return u, nil
}

// get fetches one required field and converts it; the first failure is kept in *err.
func (f fields) get(key string, err *error, conv func(json.RawMessage) error) {
	if *err != nil {
		return
	}
	raw, ok := f[key]
	if !ok {
		*err = fmt.Errorf("missing field %q", key)
		return
	}
	if e := conv(raw); e != nil {
		*err = fmt.Errorf("field %q: %v", key, e)
	}
}

func str(dst *string) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		var v interface{}
		if err := json.Unmarshal(raw, &v); err != nil {
			return err
		}
		s, ok := v.(string)
		if !ok {
			return fmt.Errorf("not a string")
		}
		*dst = s
		return nil
	}
}

func strs(dst *[]string) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		var list []json.RawMessage
		if err := json.Unmarshal(raw, &list); err != nil || list == nil {
			return fmt.Errorf("not an array")
		}
		out := make([]string, len(list))
		for i, r := range list {
			if err := str(&out[i])(r); err != nil {
				return fmt.Errorf("item %d: %v", i, err)
			}
		}
		*dst = out
		return nil
	}
}

func u32(dst *uint32) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		u, err := unsigned(raw, 32)
		*dst = uint32(u)
		return err
	}
}

func u64(dst *uint64) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		u, err := unsigned(raw, 64)
		*dst = u
		return err
	}
}

func i32(dst *int32) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		i, err := integer(raw, math.MinInt32, math.MaxInt32)
		*dst = int32(i)
		return err
	}
}

func f64(dst *float64) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		n, ok := number(raw)
		if !ok {
			return fmt.Errorf("not a number")
		}
		v, err := n.Float64()
		*dst = v
		return err
	}
}

// objects decodes an array of objects, each with decode.
func objects(raw json.RawMessage, decode func(i int, f fields) error) error {
	var list []json.RawMessage
	if err := json.Unmarshal(raw, &list); err != nil || list == nil {
		return fmt.Errorf("not an array")
	}
	for i, r := range list {
		f, err := object(r)
		if err != nil {
			return fmt.Errorf("item %d is not an object", i)
		}
		if err := decode(i, f); err != nil {
			return fmt.Errorf("item %d: %v", i, err)
		}
	}
	return nil
}

func count(raw json.RawMessage) int {
	var list []json.RawMessage
	_ = json.Unmarshal(raw, &list)
	return len(list)
}

func decodeInfo(raw json.RawMessage, n *Info) error {
	f, err := object(raw)
	if err != nil {
		return fmt.Errorf("not an object")
	}
	f.get("name", &err, str(&n.Name))
	f.get("mode", &err, str(&n.Mode))
	f.get("subnet", &err, str(&n.Subnet))
	f.get("gateway", &err, str(&n.Gateway))
	f.get("mask", &err, str(&n.Mask))
	f.get("mtu", &err, u32(&n.MTU))
	f.get("bridge", &err, str(&n.Bridge))
	f.get("interface", &err, str(&n.Interface))
	f.get("mac", &err, str(&n.MAC))
	return err
}

func u16(dst *uint16) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		v, err := unsigned(raw, 16)
		*dst = uint16(v)
		return err
	}
}

func decodeForward(raw json.RawMessage, fw *Forward) error {
	f, err := object(raw)
	if err != nil {
		return fmt.Errorf("not an object")
	}
	f.get("network_name", &err, str(&fw.NetworkName))
	f.get("protocol", &err, str(&fw.Protocol))
	f.get("external_port", &err, u16(&fw.ExternalPort))
	f.get("internal_port", &err, u16(&fw.InternalPort))
	f.get("interface", &err, str(&fw.Interface))
	f.opt("internal_address", &err, optStr(&fw.InternalAddress))
	return err
}

func decodeStatus(raw json.RawMessage, s *Status) error {
	f, err := object(raw)
	if err != nil {
		return fmt.Errorf("not an object")
	}
	f.get("version", &err, str(&s.Version))
	f.get("protocol", &err, u32(&s.Protocol))
	f.get("pid", &err, u32(&s.PID))
	f.get("idle_timeout_seconds", &err, f64(&s.IdleTimeoutSeconds))
	f.get("networks", &err, func(raw json.RawMessage) error {
		s.Networks = make([]NetworkStatus, count(raw))
		return objects(raw, func(i int, f fields) (err error) {
			n := &s.Networks[i]
			f.get("name", &err, str(&n.Name))
			f.get("mode", &err, str(&n.Mode))
			f.get("subnet", &err, str(&n.Subnet))
			f.get("gateway", &err, str(&n.Gateway))
			f.get("bridge", &err, str(&n.Bridge))
			f.get("mtu", &err, u32(&n.MTU))
			f.get("clients", &err, u64(&n.Clients))
			f.get("taps", &err, strs(&n.Taps))
			if raw, ok := f["removal_in_seconds"]; ok && err == nil && string(raw) != "null" {
				var v float64
				if e := f64(&v)(raw); e != nil {
					return fmt.Errorf("field \"removal_in_seconds\": %v", e)
				}
				n.RemovalInSeconds = &v
			}
			return err
		})
	})
	f.get("clients", &err, func(raw json.RawMessage) error {
		s.Clients = make([]ClientStatus, count(raw))
		return objects(raw, func(i int, f fields) (err error) {
			c := &s.Clients[i]
			f.get("id", &err, u64(&c.ID))
			f.get("pid", &err, i32(&c.PID))
			f.get("uid", &err, u32(&c.UID))
			f.get("gid", &err, u32(&c.GID))
			f.get("networks", &err, strs(&c.Networks))
			return err
		})
	})
	return err
}

// opt fetches one optional field: absent or null leaves it unset.
func (f fields) opt(key string, err *error, conv func(json.RawMessage) error) {
	if raw, ok := f[key]; ok && string(raw) != "null" {
		f.get(key, err, conv)
	}
}

func optStr(dst **string) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		var v string
		if err := str(&v)(raw); err != nil {
			return err
		}
		*dst = &v
		return nil
	}
}

func optU32(dst **uint32) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		var v uint32
		if err := u32(&v)(raw); err != nil {
			return err
		}
		*dst = &v
		return nil
	}
}

func optU64(dst **uint64) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		var v uint64
		if err := u64(&v)(raw); err != nil {
			return err
		}
		*dst = &v
		return nil
	}
}

func optI32(dst **int32) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		var v int32
		if err := i32(&v)(raw); err != nil {
			return err
		}
		*dst = &v
		return nil
	}
}

func optF64(dst **float64) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		var v float64
		if err := f64(&v)(raw); err != nil {
			return err
		}
		*dst = &v
		return nil
	}
}

func boolean(dst *bool) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		switch string(raw) {
		case "true":
			*dst = true
		case "false":
			*dst = false
		default:
			return fmt.Errorf("not a boolean")
		}
		return nil
	}
}

// anyJSON decodes a field of a given JSON kind (an object, an array) into dst as
// encoding/json does, after checking that it is of that kind.
func anyJSON(dst interface{}, open byte) func(json.RawMessage) error {
	return func(raw json.RawMessage) error {
		trimmed := bytes.TrimSpace(raw)
		if len(trimmed) == 0 || trimmed[0] != open {
			return fmt.Errorf("not of the expected JSON kind")
		}
		return json.Unmarshal(raw, dst)
	}
}

func decodeList(raw json.RawMessage, l *NetworkList) error {
	f, err := object(raw)
	if err != nil {
		return fmt.Errorf("not an object")
	}
	f.get("networks", &err, func(raw json.RawMessage) error {
		l.Networks = make([]NetworkSummary, count(raw))
		return objects(raw, func(i int, f fields) (err error) {
			n := &l.Networks[i]
			f.get("name", &err, str(&n.Name))
			f.get("mode", &err, str(&n.Mode))
			f.get("subnets", &err, strs(&n.Subnets))
			f.get("state", &err, str(&n.State))
			f.opt("removal_in_seconds", &err, optF64(&n.RemovalInSeconds))
			f.get("clients", &err, u64(&n.Clients))
			f.get("taps", &err, u64(&n.Taps))
			return err
		})
	})
	f.opt("truncated", &err, boolean(&l.Truncated))
	return err
}

func decodeDetail(raw json.RawMessage, d *NetworkDetail) error {
	f, err := object(raw)
	if err != nil {
		return fmt.Errorf("not an object")
	}
	f.get("name", &err, str(&d.Name))
	f.get("mode", &err, str(&d.Mode))
	f.get("state", &err, str(&d.State))
	f.opt("removal_in_seconds", &err, optF64(&d.RemovalInSeconds))
	f.get("config", &err, anyJSON(&d.Config, '{'))
	f.opt("subnet", &err, optStr(&d.Subnet))
	f.opt("gateway", &err, optStr(&d.Gateway))
	f.opt("mask", &err, optStr(&d.Mask))
	f.get("mtu", &err, u32(&d.MTU))
	f.opt("bridge", &err, optStr(&d.Bridge))
	f.get("platform", &err, anyJSON(&d.Platform, '{'))
	f.get("clients", &err, u64(&d.Clients))
	f.get("forwards", &err, anyJSON(&d.Forwards, '['))
	f.get("taps", &err, func(raw json.RawMessage) error {
		d.Taps = make([]TapInfo, count(raw))
		return objects(raw, func(i int, f fields) (err error) {
			t := &d.Taps[i]
			f.get("interface", &err, str(&t.Interface))
			f.opt("mac", &err, optStr(&t.MAC))
			f.opt("uid", &err, optU32(&t.UID))
			f.opt("client", &err, optU64(&t.Client))
			f.opt("pid", &err, optI32(&t.PID))
			return err
		})
	})
	f.opt("truncated", &err, boolean(&d.Truncated))
	return err
}

func decodeLeases(raw json.RawMessage, l *LeaseList) error {
	f, err := object(raw)
	if err != nil {
		return fmt.Errorf("not an object")
	}
	f.get("leases", &err, func(raw json.RawMessage) error {
		l.Leases = make([]LeaseInfo, count(raw))
		return objects(raw, func(i int, f fields) (err error) {
			e := &l.Leases[i]
			f.get("network", &err, str(&e.Network))
			f.get("mac", &err, str(&e.MAC))
			f.get("ipv4", &err, str(&e.IPv4))
			f.opt("ipv6", &err, optStr(&e.IPv6))
			f.opt("hostname", &err, optStr(&e.Hostname))
			f.get("expires_at", &err, u64(&e.ExpiresAt))
			f.get("expires_in_seconds", &err, u64(&e.ExpiresInSeconds))
			f.opt("interface", &err, optStr(&e.Interface))
			f.opt("uid", &err, optU32(&e.UID))
			f.opt("client", &err, optU64(&e.Client))
			f.opt("pid", &err, optI32(&e.PID))
			return err
		})
	})
	f.opt("truncated", &err, boolean(&l.Truncated))
	return err
}
