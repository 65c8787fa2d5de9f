//go:build linux

package proxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/usher-mail/usher/internal/testutil"
)

func rawPair(t *testing.T) (raw net.Conn, peer *net.TCPConn) {
	t.Helper()
	a, b := testutil.TCPPair(t)
	raw = wrapConn(a)
	if _, ok := raw.(*rawConn); !ok {
		t.Fatalf("wrapConn(*net.TCPConn) = %T, want *rawConn", raw)
	}
	if unwrapConn(raw) != net.Conn(a) {
		t.Fatalf("unwrapConn does not return the socket")
	}
	return raw, b
}

// Reads and writes behave like the socket's own: data both ways, io.EOF at
// the end, zero-length reads, a CloseWrite the peer sees.
func TestRawConnReadWrite(t *testing.T) {
	raw, peer := rawPair(t)
	_ = raw.SetDeadline(time.Now().Add(testutil.DefaultTimeout))
	_ = peer.SetDeadline(time.Now().Add(testutil.DefaultTimeout))
	if n, err := raw.Write([]byte("* OK hello\r\n")); n != 12 || err != nil {
		t.Fatalf("Write: %d %v", n, err)
	}
	buf := make([]byte, 64)
	if n, err := io.ReadAtLeast(peer, buf, 12); err != nil || string(buf[:n]) != "* OK hello\r\n" {
		t.Fatalf("peer read %q %v", buf[:n], err)
	}
	if n, err := raw.Read(nil); n != 0 || err != nil {
		t.Errorf("zero-length Read: %d %v", n, err)
	}
	_, _ = peer.Write([]byte("a LOGIN u p\r\n"))
	if n, err := io.ReadAtLeast(raw, buf, 13); err != nil || string(buf[:n]) != "a LOGIN u p\r\n" {
		t.Fatalf("Read %q %v", buf[:n], err)
	}
	if err := raw.(*rawConn).CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	if n, err := peer.Read(buf); n != 0 || err != io.EOF {
		t.Errorf("peer after CloseWrite: %d %v, want io.EOF", n, err)
	}
	peer.Close()
	if n, err := raw.Read(buf); n != 0 || err != io.EOF {
		t.Errorf("Read after the peer closed: %d %v, want io.EOF", n, err)
	}
}

// A write larger than the socket buffers waits for the reader (the EAGAIN
// path) and delivers every byte in order.
func TestRawConnLargeWrite(t *testing.T) {
	raw, peer := rawPair(t)
	_ = raw.(*rawConn).Conn.(*net.TCPConn).SetWriteBuffer(32 << 10)
	_ = peer.SetReadBuffer(32 << 10)
	data := make([]byte, 4<<20)
	_, _ = rand.Read(data)
	got := make(chan []byte, 1)
	go func() {
		_ = peer.SetReadDeadline(time.Now().Add(testutil.DefaultTimeout))
		b, _ := io.ReadAll(io.LimitReader(peer, int64(len(data))))
		got <- b
	}()
	_ = raw.SetWriteDeadline(time.Now().Add(testutil.DefaultTimeout))
	if n, err := raw.Write(data); n != len(data) || err != nil {
		t.Fatalf("Write: %d of %d, %v", n, len(data), err)
	}
	if b := <-got; !bytes.Equal(b, data) {
		t.Errorf("peer got %d bytes, not what was written", len(b))
	}
}

// Deadlines, Close and a reset peer give the errors net's own conns give.
func TestRawConnErrors(t *testing.T) {
	raw, peer := rawPair(t)
	buf := make([]byte, 16)

	_ = raw.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := raw.Read(buf)
	var ne net.Error
	var oe *net.OpError
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() || !errors.As(err, &oe) || oe.Op != "read" {
		t.Errorf("Read past the deadline: %v, want a read timeout", err)
	}

	// The peer resets the connection: a write fails with the errno.
	_ = peer.SetLinger(0)
	peer.Close()
	_ = raw.SetDeadline(time.Now().Add(testutil.DefaultTimeout))
	var werr error
	for i := 0; i < 100 && werr == nil; i++ {
		_, werr = raw.Write([]byte("x"))
		time.Sleep(time.Millisecond)
	}
	if !errors.Is(werr, syscall.ECONNRESET) && !errors.Is(werr, syscall.EPIPE) || !errors.As(werr, &oe) || oe.Op != "write" {
		t.Errorf("Write to a reset peer: %v, want ECONNRESET or EPIPE in a write OpError", werr)
	}

	// Close while a Read waits: it returns net.ErrClosed.
	raw2, _ := rawPair(t)
	done := make(chan error, 1)
	go func() { _, err := raw2.Read(buf); done <- err }()
	time.Sleep(20 * time.Millisecond)
	raw2.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Read during Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(testutil.DefaultTimeout):
		t.Fatal("Read did not return after Close")
	}
}

// UNIX sockets are wrapped too; anything else is left alone.
func TestWrapConnKinds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			_, _ = c.Write([]byte("+OK\r\n"))
			c.Close()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w := wrapConn(c)
	if _, ok := w.(*rawConn); !ok {
		t.Fatalf("wrapConn(*net.UnixConn) = %T", w)
	}
	_ = w.SetReadDeadline(time.Now().Add(testutil.DefaultTimeout))
	if b, err := io.ReadAll(w); string(b) != "+OK\r\n" || err != nil {
		t.Errorf("read %q %v", b, err)
	}
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	if wrapConn(p1) != p1 {
		t.Errorf("wrapConn wrapped a pipe")
	}
}

// AckNow leaves delayed-ACK mode, through the wrapper too.
func TestAckNow(t *testing.T) {
	raw, _ := rawPair(t)
	tc := unwrapConn(raw).(*net.TCPConn)
	rc, err := tc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	quickack := func() int {
		v := -1
		_ = rc.Control(func(fd uintptr) { v, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_QUICKACK) })
		return v
	}
	_ = rc.Control(func(fd uintptr) { _ = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_QUICKACK, 0) })
	if v := quickack(); v != 0 {
		t.Fatalf("TCP_QUICKACK after setting 0 reads %d", v)
	}
	AckNow(raw)
	if v := quickack(); v != 1 {
		t.Errorf("TCP_QUICKACK after AckNow reads %d, want 1", v)
	}
}
