package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/testutil"
)

// ioTimeout bounds every blocking step of a test so a bug shows up as a
// failure, never as a hung test binary.
const ioTimeout = 5 * time.Second

// handlerFunc adapts a function to Handler.
type handlerFunc func(ctx context.Context, s *Session) string

func (f handlerFunc) Serve(ctx context.Context, s *Session) string { return f(ctx, s) }

// syncBuffer is a log buffer safe for the concurrent writes of a logger
// shared by many sessions and the reads of the test.
type syncBuffer struct{ testutil.LogBuffer }

// records parses the JSON log lines written so far.
func (b *syncBuffer) records(t testing.TB) []map[string]any {
	t.Helper()
	var out []map[string]any
	for line := range strings.SplitSeq(strings.TrimSpace(b.String()), "\n") {
		if line == "" {
			continue
		}
		m := map[string]any{}
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q is not JSON: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// withMsg returns the records whose msg is msg.
func withMsg(recs []map[string]any, msg string) []map[string]any {
	var out []map[string]any
	for _, r := range recs {
		if r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// testServer is a running Server on 127.0.0.1 with its JSON log.
type testServer struct {
	srv    *Server
	addr   string // first listener
	addrs  []string
	cancel context.CancelFunc
	done   chan struct{} // closed when Serve returns
	logs   *syncBuffer
}

// startServer listens on o.Listeners (default one plaintext listener on
// 127.0.0.1:0) and serves until the test ends.
func startServer(t *testing.T, o ServerOptions) *testServer {
	t.Helper()
	if len(o.Listeners) == 0 {
		o.Listeners = []ListenerSpec{{Address: "127.0.0.1:0"}}
	}
	if o.Proto == "" {
		o.Proto = "imap"
	}
	logs := &syncBuffer{}
	o.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv := NewServer(o)
	if err := srv.Listen(); err != nil {
		t.Fatalf("Listen: %v", err)
	}
	ts := &testServer{srv: srv, logs: logs, done: make(chan struct{})}
	// The Server has no exported way to learn a :0 listener's port; this is
	// an internal test, so read it from the listener.
	for _, ln := range srv.lns {
		ts.addrs = append(ts.addrs, ln.Addr().String())
	}
	ts.addr = ts.addrs[0]
	ctx, cancel := context.WithCancel(context.Background())
	ts.cancel = cancel
	go func() {
		srv.Serve(ctx)
		close(ts.done)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-ts.done:
		case <-time.After(ioTimeout):
			t.Errorf("Serve did not return %v after cancel", ioTimeout)
		}
	})
	return ts
}

// stop cancels Serve and waits for it to return.
func (ts *testServer) stop(t *testing.T) {
	t.Helper()
	ts.cancel()
	select {
	case <-ts.done:
	case <-time.After(ioTimeout):
		t.Fatalf("Serve did not return %v after cancel", ioTimeout)
	}
}

// dialFrom connects to addr from the loopback address local ("" = any).
func dialFrom(t testing.TB, local, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: ioTimeout}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %q: %v", addr, local, err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	return c
}

// readLine reads one line byte by byte (no read-ahead, so the caller can keep
// reading from c afterwards).
func readLine(t testing.TB, c net.Conn) string {
	t.Helper()
	var b []byte
	one := make([]byte, 1)
	for len(b) < 1024 {
		n, err := c.Read(one)
		if n == 1 {
			b = append(b, one[0])
			if one[0] == '\n' {
				return string(b)
			}
		}
		if err != nil {
			t.Fatalf("read line (got %q so far): %v", b, err)
		}
	}
	t.Fatalf("line too long: %q", b)
	return ""
}

// expectEOF asserts that the peer closed c: the next read returns EOF (or a
// reset) before the deadline and no data.
func expectEOF(t testing.TB, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(ioTimeout))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if n > 0 {
		t.Fatalf("expected EOF, read %q", buf[:n])
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection not closed by the server within %v", ioTimeout)
	}
	if err == nil {
		t.Fatal("expected EOF, read returned no error")
	}
}

// readAll reads c to EOF (with the test deadline).
func readAll(t testing.TB, c net.Conn) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(ioTimeout))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Errorf("read to EOF: %v (got %d bytes)", err, len(b))
	}
	return b
}
