package vmnetbroker

import "fmt"

// Code is a vmnet-broker status code (docs/protocol.md). The numbers are the original
// macOS broker's and never change; codes this version does not know are kept as they are.
type Code int64

const (
	Success           Code = 0
	BrokerUnreachable Code = 1 // client side: cannot connect, or the connection broke
	InvalidReply      Code = 2 // client side: the broker's reply was malformed
	NotAllowed        Code = 3
	InvalidRequest    Code = 4
	NotFound          Code = 5
	CreateFailure     Code = 6
	InternalError     Code = 7
	// PortInUse: a port forward's external port is taken (by another forward or a
	// socket on the host). New in this broker; the original has no port forwards.
	PortInUse Code = 8

	// XPCFailure is the original library's name for BrokerUnreachable.
	XPCFailure = BrokerUnreachable
)

// Strerror returns the original client library's message for a code,
// "(unknown status)" for codes it does not know.
func Strerror(c Code) string {
	switch c {
	case Success:
		return "Success"
	case BrokerUnreachable:
		return "Failed to communicate with the broker"
	case InvalidReply:
		return "Invalid reply from the broker"
	case NotAllowed:
		return "You are not allowed to create a network"
	case InvalidRequest:
		return "Invalid broker request"
	case NotFound:
		return "Network name not found"
	case CreateFailure:
		return "Failed to create network"
	case InternalError:
		return "Internal or unknown error"
	case PortInUse:
		return "Port already in use"
	}
	return "(unknown status)"
}

func (c Code) String() string { return Strerror(c) }

// Error is every error this package returns: a status code, the broker's (or this
// library's) detail message, and for local failures the underlying error.
//
// Match codes with errors.Is(err, ErrNotFound) and so on, or read Code via errors.As.
type Error struct {
	Code    Code
	Message string
	Err     error
}

func (e *Error) Error() string {
	s := "vmnet-broker: "
	if e.Message != "" && e.Message != Strerror(e.Code) {
		s += fmt.Sprintf("%s (%s, code %d)", e.Message, Strerror(e.Code), int64(e.Code))
	} else {
		s += fmt.Sprintf("%s (code %d)", Strerror(e.Code), int64(e.Code))
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// Is makes errors.Is compare codes: any *Error with the same Code matches.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

func sentinel(c Code) *Error { return &Error{Code: c, Message: Strerror(c)} }

// Sentinels for errors.Is.
var (
	ErrBrokerUnreachable = sentinel(BrokerUnreachable)
	ErrInvalidReply      = sentinel(InvalidReply)
	ErrNotAllowed        = sentinel(NotAllowed)
	ErrInvalidRequest    = sentinel(InvalidRequest)
	ErrNotFound          = sentinel(NotFound)
	ErrCreateFailure     = sentinel(CreateFailure)
	ErrInternalError     = sentinel(InternalError)
	ErrPortInUse         = sentinel(PortInUse)
)
