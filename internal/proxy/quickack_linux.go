//go:build linux

package proxy

import (
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
)

// AckNow makes the kernel acknowledge at once what c has received so far
// (TCP_QUICKACK), instead of delaying the ACK by up to 40 ms. A proxy that
// pipelines commands needs it: the backend answers the first commands at
// once and the login only after its authentication, and a peer that delays
// small segments until the previous one is acknowledged (Nagle's
// algorithm, which Dovecot's login processes leave on) would hold the login
// answer until the delayed ACK. c may be a TLS connection's TCP socket; for
// anything but a TCP socket AckNow does nothing.
func AckNow(c net.Conn) {
	tc, ok := unwrapConn(c).(*net.TCPConn)
	if !ok {
		return
	}
	if rc, err := tc.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			// Raw, like the reads and writes around it (rawconn_linux.go).
			one := int32(1)
			unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_QUICKACK,
				uintptr(unsafe.Pointer(&one)), unsafe.Sizeof(one), 0)
		})
	}
}
