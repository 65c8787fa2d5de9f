//go:build !linux

package proxy

import "net"

// wrapConn returns c: raw system calls are Linux's (rawconn_linux.go).
func wrapConn(c net.Conn) net.Conn { return c }

// unwrapRaw returns c.
func unwrapRaw(c net.Conn) (net.Conn, bool) { return c, false }
