//go:build !linux

package proxy

import (
	"errors"
	"log/slog"
	"net"
)

// Relay is the Linux event-loop relay (relay_linux.go). Elsewhere there is
// none: NewRelay returns nil and Splice copies with goroutines.
type Relay struct{}

// RelayOptions configure NewRelay.
type RelayOptions struct {
	Loops  int
	Chunk  int
	Logger *slog.Logger
}

// NewRelay returns nil: no event-loop relay on this system.
func NewRelay(RelayOptions) (*Relay, error) { return nil, nil }

// Close does nothing.
func (*Relay) Close() error { return nil }

func relayable(net.Conn) bool { return false }

func (*Relay) take(net.Conn, net.Conn, func(string, int64, int64)) (func(string), error) {
	return nil, errors.ErrUnsupported
}
