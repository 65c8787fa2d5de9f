package wire_test

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/wire"
)

func TestReaderContext(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	ctx, cancel := context.WithCancel(context.Background())
	r := wire.NewReaderContext(ctx, server, time.Minute, 0)
	stop := wire.WatchContext(ctx, server)
	defer stop()

	go func() { _, _ = client.Write([]byte("a NOOP\r\n")) }()
	if line, err := r.ReadLine(); err != nil || string(line) != "a NOOP" {
		t.Fatalf("ReadLine = %q, %v", line, err)
	}
	// A read blocked on a silent peer returns when ctx ends, although the
	// Reader set a one-minute deadline.
	errc := make(chan error, 1)
	go func() {
		_, err := r.ReadLine()
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("blocked read: %v, want a deadline error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("blocked read did not return after cancel")
	}
	// The next read's fresh deadline does not undo the cancellation, even
	// with data waiting.
	go func() { _, _ = client.Write([]byte("b NOOP\r\n")) }()
	if _, err := r.ReadLine(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read after cancel: %v, want a deadline error", err)
	}
	if stop() {
		t.Error("stop reports the watch as not yet fired")
	}
}

func TestWatchContextStop(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	ctx, cancel := context.WithCancel(context.Background())
	stop := wire.WatchContext(ctx, server)
	if !stop() {
		t.Fatal("stop before cancel reports false")
	}
	cancel()
	// The watch was stopped: reads still work.
	go func() { _, _ = client.Write([]byte("x\n")) }()
	r := wire.NewReader(server, time.Second, 0)
	if line, err := r.ReadLine(); err != nil || string(line) != "x" {
		t.Fatalf("ReadLine after stopped watch = %q, %v", line, err)
	}
	if !wire.PastDeadline().Before(time.Now()) {
		t.Error("PastDeadline is not in the past")
	}
}
