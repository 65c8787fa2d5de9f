package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/usher-mail/usher/internal/testutil"
)

// echoAddr is a handler that writes the session's remote, local and trust
// state, then ends.
func echoAddr(_ context.Context, s *Session) string {
	fmt.Fprintf(s.Conn, "remote=%s local=%s trusted=%v\r\n", s.Remote, s.Local, s.Trusted)
	return "done"
}

func TestUnixListener(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lmtp.sock")
	ts := startServer(t, ServerOptions{
		Handler:   handlerFunc(echoAddr),
		Listeners: []ListenerSpec{{Address: "unix:" + path, Mode: 0o600}},
		Allow:     []netip.Prefix{netip.MustParsePrefix("10.9.9.9/32")}, // not applied to UNIX clients
	})
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket with 0600", fi.Mode())
	}
	c, err := net.DialTimeout("unix", path, ioTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	line := readLine(t, c)
	if !strings.Contains(line, "trusted=true") || !strings.HasPrefix(line, "remote=invalid") {
		t.Fatalf("unix session saw %q; want no client IP and trusted", line)
	}
	recs := withMsg(ts.logs.records(t), "session start")
	if len(recs) != 1 || recs[0]["remote"] != "unix:"+path {
		t.Fatalf("session start logs %v, want remote = the socket path", recs)
	}
}

func TestUnixListenerReplacesStaleSocketOnly(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "plain")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := listen(ListenerSpec{Address: "unix:" + file}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen over a regular file: %v", err)
	}
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := listen(ListenerSpec{Address: "unix:" + sock}); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("listen over a live socket: %v", err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // leaves a stale socket file
	ln2, err := listen(ListenerSpec{Address: "unix:" + sock})
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	ln2.Close()
}

func TestAllowList(t *testing.T) {
	ts := startServer(t, ServerOptions{
		Handler: handlerFunc(echoAddr),
		Allow:   []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")},
	})
	ok := dialFrom(t, "127.0.0.2", ts.addr)
	if line := readLine(t, ok); !strings.HasPrefix(line, "remote=127.0.0.2:") {
		t.Fatalf("allowed client got %q", line)
	}
	refused := dialFrom(t, "127.0.0.3", ts.addr)
	expectEOF(t, refused)
	testutil.WaitFor(t, ioTimeout, "refusal logged", func() bool {
		for _, r := range withMsg(ts.logs.records(t), "connection refused") {
			if r["reason"] == "client address not in allow list" && strings.HasPrefix(r["remote"].(string), "127.0.0.3:") {
				return true
			}
		}
		return false
	})
}

func writeHeader(t *testing.T, c net.Conn, version byte, src, dst string) {
	t.Helper()
	h := proxyproto.HeaderProxyFromAddrs(version, net.TCPAddrFromAddrPort(netip.MustParseAddrPort(src)),
		net.TCPAddrFromAddrPort(netip.MustParseAddrPort(dst)))
	if _, err := h.WriteTo(c); err != nil {
		t.Fatal(err)
	}
}

func TestProxyProtocolIn(t *testing.T) {
	ts := startServer(t, ServerOptions{
		Handler:            handlerFunc(echoAddr),
		Listeners:          []ListenerSpec{{Address: "127.0.0.1:0", ProxyProtocol: true}},
		ProxyTrusted:       []netip.Prefix{netip.MustParsePrefix("127.0.0.4/32")},
		Trusted:            []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
		Allow:              []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.0/24")},
		ProxyHeaderTimeout: 300 * time.Millisecond,
	})
	for _, v := range []byte{1, 2} {
		c := dialFrom(t, "127.0.0.4", ts.addr)
		writeHeader(t, c, v, "192.0.2.7:5555", "203.0.113.1:143")
		if line := strings.TrimSpace(readLine(t, c)); line != "remote=192.0.2.7:5555 local=203.0.113.1:143 trusted=true" {
			t.Fatalf("v%d: session saw %q", v, line)
		}
	}
	// The real client address is what the allow list checks.
	c := dialFrom(t, "127.0.0.4", ts.addr)
	writeHeader(t, c, 2, "203.0.113.9:1", "203.0.113.1:143")
	expectEOF(t, c)
	// A peer outside proxy_trusted is refused, header or not.
	c = dialFrom(t, "127.0.0.5", ts.addr)
	writeHeader(t, c, 2, "192.0.2.7:5555", "203.0.113.1:143")
	expectEOF(t, c)
	// A trusted peer that sends no header is cut off after the timeout.
	c = dialFrom(t, "127.0.0.4", ts.addr)
	start := time.Now()
	expectEOF(t, c)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("missing header held the connection %v", d)
	}
	// Garbage instead of a header is refused.
	c = dialFrom(t, "127.0.0.4", ts.addr)
	fmt.Fprintf(c, "a LOGIN x y\r\n")
	expectEOF(t, c)
	testutil.WaitFor(t, ioTimeout, "refusals logged", func() bool {
		return len(withMsg(ts.logs.records(t), "connection refused")) >= 4
	})
}

func TestProxyProtocolKeepsEarlyBytes(t *testing.T) {
	got := make(chan string, 1)
	ts := startServer(t, ServerOptions{
		Handler: handlerFunc(func(_ context.Context, s *Session) string {
			buf := make([]byte, 5)
			_ = s.Conn.SetReadDeadline(time.Now().Add(ioTimeout))
			n, _ := s.Conn.Read(buf)
			got <- string(buf[:n])
			return "done"
		}),
		Listeners:    []ListenerSpec{{Address: "127.0.0.1:0", ProxyProtocol: true}},
		ProxyTrusted: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
	})
	c := dialFrom(t, "", ts.addr)
	h := proxyproto.HeaderProxyFromAddrs(1, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1}, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 2})
	b, _ := h.Format()
	if _, err := c.Write(append(b, "hello"...)); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-got:
		if s != "hello" {
			t.Fatalf("handler read %q after the header, want hello", s)
		}
	case <-time.After(ioTimeout):
		t.Fatal("handler read nothing")
	}
}

func TestSendProxyToBackend(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	hdr := make(chan *proxyproto.Header, 2)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			pc := proxyproto.NewConn(c)
			hdr <- pc.ProxyHeader()
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	s := &Session{Remote: netip.MustParseAddrPort("192.0.2.7:5555"), Local: netip.MustParseAddrPort("192.0.2.1:143")}
	for _, v := range []string{"v1", "v2"} {
		o := BackendOptions{Port: port, SendProxy: v, ConnectTimeout: ioTimeout}
		c, err := o.DialFor(context.Background(), netip.MustParseAddr("127.0.0.1"), s)
		if err != nil {
			t.Fatal(err)
		}
		h := <-hdr
		c.Close()
		if h == nil || h.SourceAddr.String() != "192.0.2.7:5555" || h.DestinationAddr.String() != "192.0.2.1:143" ||
			int(h.Version) != int(v[1]-'0') {
			t.Fatalf("%s: backend got header %+v", v, h)
		}
	}
}
