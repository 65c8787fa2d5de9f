//go:build !linux

package proxy

import "net"

// AckNow does nothing here: TCP_QUICKACK is Linux's (see quickack_linux.go).
func AckNow(net.Conn) {}
