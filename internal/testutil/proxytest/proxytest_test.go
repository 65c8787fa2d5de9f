package proxytest

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/usher-mail/usher/internal/config"
	"github.com/usher-mail/usher/internal/proxy"
	"github.com/usher-mail/usher/internal/testutil"
)

func TestDirector(t *testing.T) {
	a, b := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")
	d := NewDirector(a)
	d.Route("bob", b)
	errDown := errors.New("down")
	d.FailUser("carol", errDown)
	kick := make(chan struct{})
	d.SetDone(kick)
	ctx := context.Background()

	la, err := d.Acquire(ctx, "alice")
	if err != nil || la.Backend != a || la.Done == nil {
		t.Fatalf("alice: %+v, %v", la, err)
	}
	lb, err := d.Acquire(ctx, "bob")
	if err != nil || lb.Backend != b {
		t.Fatalf("bob: %+v, %v", lb, err)
	}
	if _, err := d.Acquire(ctx, "carol"); !errors.Is(err, errDown) {
		t.Fatalf("carol: %v", err)
	}
	d.SetErr(proxy.ErrUnavailable)
	if _, err := d.Acquire(ctx, "alice"); !errors.Is(err, proxy.ErrUnavailable) {
		t.Fatalf("with SetErr: %v", err)
	}
	if d.Held() != 2 || d.Acquired() != 2 || d.Released() != 0 {
		t.Errorf("held %d acquired %d released %d", d.Held(), d.Acquired(), d.Released())
	}
	la.Release()
	la.Release() // a lease counts once
	acq, rel, users := d.Counts()
	if acq != 2 || rel != 1 || !slices.Equal(users, []string{"alice", "bob", "carol", "alice"}) || !slices.Equal(d.Users(), users) {
		t.Errorf("counts %d %d %q", acq, rel, users)
	}
}

// echo greets, echoes one line and returns it as the end reason.
type echo struct{}

func (echo) Serve(ctx context.Context, s *proxy.Session) string {
	_, _ = s.Conn.Write([]byte("hello " + s.Proto + " " + s.ID + "\r\n"))
	buf := make([]byte, 64)
	n, _ := s.Conn.Read(buf)
	line := strings.TrimSpace(string(buf[:n]))
	_, _ = s.Conn.Write([]byte(line + "\r\n"))
	s.Log.Info("done", "line", line)
	return line
}

func TestStartSession(t *testing.T) {
	s := StartSession(t, echo{}, SessionOptions{Proto: "x", ID: "s1", Trusted: true})
	if !s.Sess.Trusted || s.Sess.TLSMode != config.TLSNone || !s.Sess.Remote.Addr().IsLoopback() {
		t.Errorf("session %+v", s.Sess)
	}
	s.Client.Expect("hello x s1")
	s.Client.Send("bye")
	s.Client.Expect("bye")
	if r := s.Wait(); r != "bye" {
		t.Errorf("reason %q", r)
	}
	if !strings.Contains(s.Logs.String(), "line=bye") {
		t.Errorf("log %q", s.Logs.String())
	}
	s.Client.ExpectClosed()
}

func TestStartSessionImplicitTLS(t *testing.T) {
	pki := testutil.LoopbackPKI(t)
	s := StartSession(t, echo{}, SessionOptions{Proto: "x", ID: "s2", TLSMode: config.TLSImplicit,
		TLSConfig: pki.Server, ClientTLS: pki.Client("127.0.0.1")})
	if !s.Sess.Secure {
		t.Error("implicit TLS session not secure")
	}
	s.Client.Expect("hello x s2")
	s.Client.Send("over tls")
	s.Client.Expect("over tls")
	if r := s.Wait(); r != "over tls" {
		t.Errorf("reason %q", r)
	}
}
