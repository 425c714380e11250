package vmnetbroker

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"net"
	"os"
	"reflect"
	"strings"
	"testing"
)

// vectors is tests/vectors/messages.json, shared with the other languages.
type vectors struct {
	ProtocolVersion int `json:"protocol_version"`
	MaxMessage      int `json:"max_message"`
	EncodeRequests  []struct {
		Description string                 `json:"description"`
		Request     map[string]interface{} `json:"request"`
		Bytes       string                 `json:"bytes"`
	} `json:"encode_requests"`
	Replies []struct {
		Description string          `json:"description"`
		Bytes       *string         `json:"bytes"`
		Hex         *string         `json:"hex"`
		Expect      json.RawMessage `json:"expect"`
	} `json:"replies"`
	Strerror []struct {
		Code   int64  `json:"code"`
		String string `json:"string"`
	} `json:"strerror"`
}

func loadVectors(t *testing.T) *vectors {
	t.Helper()
	b, err := os.ReadFile("../../tests/vectors/messages.json")
	if err != nil {
		t.Fatalf("reading the shared vectors: %v", err)
	}
	var v vectors
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("parsing the shared vectors: %v", err)
	}
	if len(v.EncodeRequests) == 0 || len(v.Replies) == 0 || len(v.Strerror) == 0 {
		t.Fatal("vectors are empty")
	}
	return &v
}

func TestVectorHeader(t *testing.T) {
	v := loadVectors(t)
	if v.ProtocolVersion != ProtocolVersion || v.MaxMessage != MaxMessage {
		t.Fatalf("vectors are for protocol %d / %d bytes, package for %d / %d",
			v.ProtocolVersion, v.MaxMessage, ProtocolVersion, MaxMessage)
	}
}

func TestEncodeRequestVectors(t *testing.T) {
	for _, tc := range loadVectors(t).EncodeRequests {
		var got []byte
		s := func(key string) string { v, _ := tc.Request[key].(string); return v }
		port := func(key string) uint16 { v, _ := tc.Request[key].(float64); return uint16(v) }
		switch s("command") {
		case "acquire":
			var mac net.HardwareAddr
			if m := s("mac"); m != "" {
				var err error
				if mac, err = net.ParseMAC(m); err != nil {
					t.Fatalf("%s: %v", tc.Description, err)
				}
			}
			got = acquireRequest(s("network_name"), mac)
		case "status":
			got = statusRequest()
		case "list":
			got = listRequest()
		case "show":
			got = showRequest(s("network_name"))
		case "leases":
			got = leasesRequest(s("network_name"))
		case "forward":
			got = forwardRequest(s("network_name"), s("protocol"), port("external_port"),
				port("internal_port"), s("interface"))
		case "metrics":
			got = metricsRequest()
		default:
			t.Fatalf("unknown command in %s", tc.Description)
		}
		if string(got) != tc.Bytes {
			t.Errorf("%s:\n got %s\nwant %s", tc.Description, got, tc.Bytes)
		}
	}
}

func TestReplyVectors(t *testing.T) {
	for _, tc := range loadVectors(t).Replies {
		var msg []byte
		switch {
		case tc.Bytes != nil:
			msg = []byte(*tc.Bytes)
		case tc.Hex != nil:
			var err error
			if msg, err = hex.DecodeString(*tc.Hex); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("%s: no message", tc.Description)
		}
		r, err := parseReply(msg)
		if string(tc.Expect) == `"invalid_reply"` {
			if err == nil || err.Code != InvalidReply || !errors.Is(err, ErrInvalidReply) {
				t.Errorf("%s: want INVALID_REPLY, got %+v, %v", tc.Description, r, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.Description, err)
			continue
		}
		var want struct {
			Network *Info          `json:"network"`
			Status  *Status        `json:"status"`
			List    *NetworkList   `json:"list"`
			Show    *NetworkDetail `json:"show"`
			Leases  *LeaseList     `json:"leases"`
			Forward *Forward       `json:"forward"`
			Metrics *string        `json:"metrics"`
			Error   *int64         `json:"error"`
			Message string         `json:"message"`
		}
		if err := json.Unmarshal(tc.Expect, &want); err != nil {
			t.Fatal(err)
		}
		switch {
		case want.Network != nil:
			if !reflect.DeepEqual(r.network, want.Network) {
				t.Errorf("%s: got %+v, want %+v", tc.Description, r.network, want.Network)
			}
		case want.Status != nil:
			if !reflect.DeepEqual(r.status, want.Status) {
				t.Errorf("%s: got %+v, want %+v", tc.Description, r.status, want.Status)
			}
		case want.List != nil:
			if !reflect.DeepEqual(r.list, want.List) {
				t.Errorf("%s: got %+v, want %+v", tc.Description, r.list, want.List)
			}
		case want.Show != nil:
			if !reflect.DeepEqual(r.show, want.Show) {
				t.Errorf("%s: got %+v, want %+v", tc.Description, r.show, want.Show)
			}
		case want.Leases != nil:
			if !reflect.DeepEqual(r.leases, want.Leases) {
				t.Errorf("%s: got %+v, want %+v", tc.Description, r.leases, want.Leases)
			}
		case want.Forward != nil:
			if !reflect.DeepEqual(r.forward, want.Forward) {
				t.Errorf("%s: got %+v, want %+v", tc.Description, r.forward, want.Forward)
			}
		case want.Metrics != nil:
			if r.metrics == nil || *r.metrics != *want.Metrics {
				t.Errorf("%s: got %v, want %q", tc.Description, r.metrics, *want.Metrics)
			}
		default:
			if r.err == nil || int64(r.err.Code) != *want.Error || r.err.Message != want.Message {
				t.Errorf("%s: got %+v, want error %d %q", tc.Description, r.err, *want.Error, want.Message)
			}
		}
	}
}

func TestStrerrorVectors(t *testing.T) {
	for _, tc := range loadVectors(t).Strerror {
		if got := Strerror(Code(tc.Code)); got != tc.String {
			t.Errorf("Strerror(%d) = %q, want %q", tc.Code, got, tc.String)
		}
	}
	if XPCFailure != BrokerUnreachable {
		t.Error("XPCFailure must alias BrokerUnreachable")
	}
}

func TestErrorsIsComparesCodes(t *testing.T) {
	r, perr := parseReply([]byte(`{"error":5,"message":"no network named \"x\""}`))
	if perr != nil {
		t.Fatal(perr)
	}
	var err error = r.err
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrNotAllowed) {
		t.Fatalf("errors.Is does not follow the code: %v", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Code != NotFound || e.Message != `no network named "x"` {
		t.Fatalf("errors.As: %+v", e)
	}
	if !strings.Contains(err.Error(), "Network name not found") || !strings.Contains(err.Error(), `"x"`) {
		t.Fatalf("message lacks the code's string or the broker's detail: %q", err)
	}
	// A code from a newer broker is kept as it is.
	r, _ = parseReply([]byte(`{"error":99}`))
	if r.err.Code != 99 || errors.Is(r.err, ErrInternalError) || !strings.Contains(r.err.Error(), "(unknown status)") {
		t.Fatalf("unknown code not preserved: %v", r.err)
	}
}

func TestAcquireWithBadMACFailsLocally(t *testing.T) {
	c := &Client{path: "unused"}
	_, err := c.AcquireWithMAC("shared", net.HardwareAddr{1, 2, 3})
	if !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("got %v", err)
	}
}
