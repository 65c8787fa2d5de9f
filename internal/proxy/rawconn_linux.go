//go:build linux

package proxy

import (
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// rawConn is a socket whose reads and writes are raw system calls (see
// rawsys_linux.go): it waits in Go's poller like any net.Conn, with the
// same deadlines, but the read(2) and write(2) themselves are not announced
// to the scheduler. An announced system call made while every processor
// is idle wakes the runtime's monitor thread (sysmon), which then polls
// every 20 µs until the program is idle again, and a loopback write long
// enough lets it hand the processor to another thread. A director spends
// its login phase in short bursts of a few small reads and writes between
// idle gaps, so that is several wake-ups per login; raw calls leave out the
// ones these reads and writes caused (measured: 11 % less CPU and 14 % fewer
// context switches per proxied IMAP login, docs/BENCHMARKS.md).
//
// Every other method is the socket's own. Splice and AckNow look through
// the wrapper (unwrapConn) to reach the socket.
type rawConn struct {
	net.Conn // *net.TCPConn or *net.UnixConn
	rc       syscall.RawConn
}

// wrapConn returns c with raw reads and writes if it is a TCP or UNIX
// socket, else c.
func wrapConn(c net.Conn) net.Conn {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return c
	}
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return c
	}
	return &rawConn{Conn: c, rc: rc}
}

// unwrapRaw returns the socket under a rawConn.
func unwrapRaw(c net.Conn) (net.Conn, bool) {
	if r, ok := c.(*rawConn); ok {
		return r.Conn, true
	}
	return c, false
}

// Read is net.Conn's Read: it waits (within the read deadline) until the
// socket is readable, returns io.EOF at the end of the stream, and errors
// as *net.OpError.
func (c *rawConn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	var n int
	var err error
	if werr := c.rc.Read(func(fd uintptr) bool {
		for {
			n, err = rawRead(int(fd), b)
			if err != unix.EINTR {
				return err != unix.EAGAIN // false: wait for readability
			}
		}
	}); werr != nil {
		return 0, c.opError("read", werr)
	}
	if err != nil {
		return 0, c.opError("read", err)
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

// Write is net.Conn's Write: it writes all of b, waiting (within the write
// deadline) whenever the socket buffer is full.
func (c *rawConn) Write(b []byte) (int, error) {
	written := 0
	var err error
	if werr := c.rc.Write(func(fd uintptr) bool {
		for written < len(b) {
			var n int
			switch n, err = rawWrite(int(fd), b[written:]); err {
			case nil:
				written += n
			case unix.EINTR:
			case unix.EAGAIN:
				err = nil
				return false // wait for writability
			default:
				return true
			}
		}
		return true
	}); werr != nil {
		return written, c.opError("write", werr)
	}
	if err != nil {
		return written, c.opError("write", err)
	}
	return written, nil
}

// CloseWrite shuts down the writing side, as the socket's own does.
func (c *rawConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// opError names op in err the way net does: the poller's errors (deadline,
// closed) come as *net.OpError already (op "raw-read"/"raw-write"), an
// errno is wrapped in an *os.SyscallError.
func (c *rawConn) opError(op string, err error) error {
	if oe, ok := err.(*net.OpError); ok {
		oe.Op = op
		return oe
	}
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(),
		Err: os.NewSyscallError(op, err)}
}
