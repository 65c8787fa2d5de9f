package testutil

import (
	"bytes"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// Listen listens on 127.0.0.1 on a free port; the listener is closed when
// the test ends.
func Listen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen on 127.0.0.1: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// Port returns the TCP port ln listens on.
func Port(ln net.Listener) int { return ln.Addr().(*net.TCPAddr).Port }

// Serve accepts connections on ln until it is closed and runs handle for
// each in its own goroutine; n counts the connections from 0. When the test
// ends it closes ln and every connection still open, and waits (at most
// DefaultTimeout, then fails the test) for the handlers to return. handle
// need not close its connection.
func Serve(t testing.TB, ln net.Listener, handle func(c net.Conn, n int)) {
	t.Helper()
	var (
		mu   sync.Mutex
		open = map[net.Conn]bool{}
		wg   sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 0; ; n++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(open, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c, n)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(DefaultTimeout):
			t.Errorf("connection handlers on %s still running %v after the test", ln.Addr(), DefaultTimeout)
		}
	})
}

// TCPPair returns the two ends of a real loopback TCP connection (so that
// io.Copy between such ends takes the splice(2) path); both are closed when
// the test ends.
func TCPPair(t testing.TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen on 127.0.0.1: %v", err)
	}
	defer ln.Close()
	type res struct {
		c   *net.TCPConn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.AcceptTCP()
		ch <- res{c, err}
	}()
	d := net.Dialer{Timeout: DefaultTimeout}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dial %s: %v", ln.Addr(), err)
	}
	dialed = c.(*net.TCPConn)
	r := <-ch
	if r.err != nil {
		dialed.Close()
		t.Fatalf("accept: %v", r.err)
	}
	t.Cleanup(func() { dialed.Close(); r.c.Close() })
	return dialed, r.c
}

// MemConn is an in-memory net.Conn for fuzzing a server: reads come from a
// fixed input and then EOF, writes are collected. Reads never block, so
// deadlines are accepted and ignored. After Close, reads and writes fail
// with net.ErrClosed. It is safe for concurrent use.
type MemConn struct {
	mu     sync.Mutex
	in     *bytes.Reader
	out    bytes.Buffer
	closed bool
	local  netip.AddrPort
	remote netip.AddrPort
}

var _ net.Conn = (*MemConn)(nil)

// NewMemConn returns a MemConn reading in, with the given addresses.
func NewMemConn(in []byte, local, remote netip.AddrPort) *MemConn {
	return &MemConn{in: bytes.NewReader(in), local: local, remote: remote}
}

func (m *MemConn) Read(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, net.ErrClosed
	}
	return m.in.Read(p)
}

func (m *MemConn) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, net.ErrClosed
	}
	return m.out.Write(p)
}

func (m *MemConn) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

// Output returns a copy of everything written so far.
func (m *MemConn) Output() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.out.Bytes())
}

func (m *MemConn) LocalAddr() net.Addr              { return net.TCPAddrFromAddrPort(m.local) }
func (m *MemConn) RemoteAddr() net.Addr             { return net.TCPAddrFromAddrPort(m.remote) }
func (m *MemConn) SetDeadline(time.Time) error      { return nil }
func (m *MemConn) SetReadDeadline(time.Time) error  { return nil }
func (m *MemConn) SetWriteDeadline(time.Time) error { return nil }
