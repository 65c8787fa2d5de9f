//go:build linux

package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/testutil"
)

// A client that does not read makes the relay keep what the backend sent
// and stop reading from the backend (backpressure); when the client reads
// again every byte arrives, in order.
func TestRelayBackpressure(t *testing.T) {
	const size = 8 << 20
	r := newRig(t, testRelay(t))
	// Small socket buffers, so that 8 MiB cannot hide in them.
	for _, c := range []net.Conn{r.clientApp, r.clientEnd, r.backendEnd, r.backendApp} {
		_ = c.(*net.TCPConn).SetReadBuffer(64 << 10)
		_ = c.(*net.TCPConn).SetWriteBuffer(64 << 10)
	}
	r.start(context.Background(), nil, nil, nil)
	down := make([]byte, size)
	rand.Read(down)
	sent := make(chan error, 1)
	go func() {
		_ = r.backendApp.SetWriteDeadline(time.Now().Add(ioTimeout))
		_, err := r.backendApp.Write(down)
		if err == nil {
			err = r.backendApp.(*net.TCPConn).CloseWrite()
		}
		sent <- err
	}()
	// Let the socket buffers and the relay fill up.
	time.Sleep(200 * time.Millisecond)
	select {
	case err := <-sent:
		t.Fatalf("the backend wrote %d MiB to a client that reads nothing (err %v): no backpressure", size>>20, err)
	default:
	}
	got := readAll(t, r.clientApp)
	if err := <-sent; err != nil {
		t.Fatalf("backend write: %v", err)
	}
	if len(got) != size || sha256.Sum256(got) != sha256.Sum256(down) {
		t.Fatalf("client got %d bytes (equal %v), want the %d sent", len(got), bytes.Equal(got, down), size)
	}
	r.clientApp.Close()
	if why := r.wait(t); why != "backend closed" {
		t.Errorf("reason = %q, want backend closed", why)
	}
	if got := r.sess.BytesOut.Load(); got != size {
		t.Errorf("BytesOut = %d, want %d", got, size)
	}
}

// A client on a UNIX socket (a unix: listener) is relayed to a TCP backend,
// half-close included.
func TestRelayUnixClient(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	clientApp, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer clientApp.Close()
	clientEnd := <-accepted
	be, ba := testutil.TCPPair(t)
	r := &spliceRig{clientApp: clientApp, clientEnd: clientEnd, backendEnd: be, backendApp: ba,
		sess: &Session{ID: "unix", relay: testRelay(t)}, reason: make(chan string, 1)}
	r.sess.finish = func(reason string) { r.reason <- reason }
	r.start(context.Background(), nil, nil, nil)
	roundTrip(t, r)
	if err := clientApp.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest := readAll(t, ba); len(rest) != 0 {
		t.Fatalf("backend read %q after the client's half-close, want EOF", rest)
	}
	final := []byte("* BYE\r\n")
	if _, err := ba.Write(final); err != nil {
		t.Fatal(err)
	}
	ba.Close()
	if rest := readAll(t, clientApp); !bytes.Equal(rest, final) {
		t.Fatalf("client got %q, want %q", rest, final)
	}
	if why := r.wait(t); why != "client closed" {
		t.Errorf("reason = %q, want client closed", why)
	}
}

// Many sessions at once on few loops: every one gets its own bytes, and the
// relay is empty when they are over.
func TestRelayManySessions(t *testing.T) {
	const n = 200
	rl := testRelay(t)
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := range n {
		r := newRig(t, rl)
		r.start(context.Background(), nil, nil, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := strings.Repeat(string(rune('a'+i%26)), 1000+i)
			_ = r.clientApp.SetDeadline(time.Now().Add(ioTimeout))
			_ = r.backendApp.SetDeadline(time.Now().Add(ioTimeout))
			if _, err := r.clientApp.Write([]byte(msg)); err != nil {
				errs <- err.Error()
				return
			}
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(r.backendApp, got); err != nil || string(got) != msg {
				errs <- "session got another session's bytes or none"
				return
			}
			r.backendApp.Close()
			if rest, _ := io.ReadAll(r.clientApp); len(rest) != 0 {
				errs <- "unexpected bytes at the client"
			}
			r.clientApp.Close()
			select {
			case <-r.reason:
			case <-time.After(ioTimeout):
				errs <- "session did not end"
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	testutil.WaitFor(t, ioTimeout, "Relay.pairs() == 0", func() bool { return rl.pairs() == 0 })
}

// Closing the relay ends what it still carries, with reason shutdown.
func TestRelayClose(t *testing.T) {
	rl, err := NewRelay(RelayOptions{Loops: 1})
	if err != nil {
		t.Fatal(err)
	}
	r := newRig(t, rl)
	r.start(context.Background(), nil, nil, nil)
	roundTrip(t, r)
	if rl.pairs() != 1 {
		t.Fatalf("pairs() = %d, want 1", rl.pairs())
	}
	rl.Close()
	if why := r.wait(t); why != relayShutdown {
		t.Errorf("reason = %q, want %q", why, relayShutdown)
	}
	expectEOF(t, r.clientApp)
	expectEOF(t, r.backendApp)
	// A closed relay refuses new sessions; Splice then copies with goroutines.
	r2 := newRig(t, rl)
	r2.start(context.Background(), nil, nil, nil)
	roundTrip(t, r2)
	if n := rl.pairs(); n != 0 {
		t.Errorf("a closed relay took a session (%d pairs)", n)
	}
	r2.clientApp.Close()
	r2.backendApp.Close()
	if why := r2.wait(t); why != "client closed" && why != "backend closed" {
		t.Errorf("reason = %q, want client or backend closed", why)
	}
}

// Through a Server with a Relay (see testHandedOffSession).
func TestServerRelayedSession(t *testing.T) {
	rl := testRelay(t)
	testHandedOffSession(t, rl, func() int { return rl.pairs() })
}

// A client connection behind a PROXY header (prefixConn) is relayed once the
// bytes that came with the header were read; before that it is not.
func TestRelayPrefixConn(t *testing.T) {
	for _, drained := range []bool{true, false} {
		rl := testRelay(t)
		r := newRig(t, rl)
		pc := &prefixConn{Conn: r.clientEnd, pre: bytes.NewReader([]byte("a1 LOGIN\r\n"))}
		if drained {
			if _, err := io.ReadAll(io.LimitReader(pc, 10)); err != nil {
				t.Fatal(err)
			}
		}
		r.clientEnd = pc
		r.start(context.Background(), nil, nil, nil)
		if !drained {
			// The prefix is still unread: it must reach the backend first.
			if got := readLine(t, r.backendApp); got != "a1 LOGIN\r\n" {
				t.Fatalf("backend got %q, want the prefix", got)
			}
		}
		roundTrip(t, r)
		if relayed := rl.pairs() == 1; relayed != drained {
			t.Errorf("drained=%v: relayed=%v", drained, relayed)
		}
		r.clientApp.Close()
		r.backendApp.Close()
		r.wait(t)
	}
}
