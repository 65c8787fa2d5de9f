package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
)

// copyConn copies src to dst until src ends, for Splice's goroutines (TLS
// sessions, and everything where there is no Relay). It keeps an idle
// session small:
//   - between two plain sockets io.Copy uses splice(2): no buffer at all;
//   - from a plain socket (the backend, when the client speaks TLS) it waits
//     until the socket is readable without holding a buffer, then copies
//     with a pooled one while data keeps coming (copyWhenReadable);
//   - from a TLS connection, whose buffered records only its own Read can
//     see, it reads into a small buffer of its own (tlsReadBuffer).
//
// io.Copy would hold a 32 KiB buffer in each direction for the whole
// session.
func copyConn(dst, src net.Conn) (int64, error) {
	if isSocket(src) && isSocket(dst) {
		return io.Copy(dst, src)
	}
	if sc, ok := src.(syscall.Conn); ok && isSocket(src) {
		if raw, err := sc.SyscallConn(); err == nil {
			return copyWhenReadable(dst, src, raw)
		}
	}
	return io.CopyBuffer(writerOnly{dst}, readerOnly{src}, make([]byte, tlsReadBuffer))
}

// tlsReadBuffer is what a TLS direction holds for the whole session: client
// commands are small; an APPEND moves in several reads.
const tlsReadBuffer = 4 << 10

// copyBuffers holds the buffers copyWhenReadable uses while data flows.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func isSocket(c net.Conn) bool {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
		return true
	}
	return false
}

// copyWhenReadable copies the plain socket src to dst, holding a buffer only
// while src has data: it waits in Go's poller until a peek (MSG_PEEK of one
// byte) finds data, end of file or an error, then reads until a read comes
// back short (the socket is drained).
func copyWhenReadable(dst, src net.Conn, raw syscall.RawConn) (int64, error) {
	var total int64
	var peek [1]byte
	for {
		err := raw.Read(func(fd uintptr) bool {
			_, _, perr := syscall.Recvfrom(int(fd), peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			return !errors.Is(perr, syscall.EAGAIN) && !errors.Is(perr, syscall.EINTR)
		})
		if err != nil {
			return total, err
		}
		bp := copyBuffers.Get().(*[]byte)
		n, err := drain(dst, src, *bp)
		copyBuffers.Put(bp)
		total += n
		if err != nil {
			if errors.Is(err, io.EOF) {
				return total, nil
			}
			return total, err
		}
	}
}

// drain copies from src to dst with buf until a read comes back short or
// fails; io.EOF is returned as such.
func drain(dst io.Writer, src io.Reader, buf []byte) (int64, error) {
	var total int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			m, werr := dst.Write(buf[:n])
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		if err != nil || n < len(buf) {
			return total, err
		}
	}
}

// writerOnly and readerOnly hide ReadFrom and WriteTo, so that
// io.CopyBuffer uses the buffer it is given.
type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }
