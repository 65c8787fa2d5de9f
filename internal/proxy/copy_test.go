package proxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/usher-mail/usher/internal/testutil"
)

// wrapped hides the connection's type, as a TLS layer does.
type wrapped struct{ net.Conn }

// From a plain socket to a connection that is not one (a client speaking
// TLS), copyConn waits for data without a buffer and copies bursts: every
// byte arrives in order, across pauses, and the end of file ends the copy.
func TestCopyWhenReadable(t *testing.T) {
	srcApp, src := testutil.TCPPair(t)
	dstEnd, dstApp := testutil.TCPPair(t)
	data := make([]byte, 1<<20+123)
	rand.Read(data)
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := copyConn(wrapped{dstEnd}, src)
		dstEnd.CloseWrite()
		done <- result{n, err}
	}()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(dstApp)
		got <- b
	}()
	// Bursts with pauses: the copy goes back to waiting in between.
	for off := 0; off < len(data); {
		n := min(len(data)-off, 100<<10)
		if _, err := srcApp.Write(data[off : off+n]); err != nil {
			t.Fatal(err)
		}
		off += n
		time.Sleep(5 * time.Millisecond)
	}
	srcApp.CloseWrite()
	var r result
	select {
	case r = <-done:
	case <-time.After(ioTimeout):
		t.Fatal("copy did not end at the source's end of file")
	}
	if r.err != nil || r.n != int64(len(data)) {
		t.Fatalf("copied %d bytes, err %v; want %d, nil", r.n, r.err, len(data))
	}
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatalf("destination got %d bytes, equal %v", len(b), bytes.Equal(b, data))
	}
}

// Closing the source while the copy waits ends it with net.ErrClosed (what
// Splice's close on a kick or shutdown does).
func TestCopyWhenReadableClosed(t *testing.T) {
	_, src := testutil.TCPPair(t)
	dstEnd, _ := testutil.TCPPair(t)
	done := make(chan error, 1)
	go func() {
		_, err := copyConn(wrapped{dstEnd}, src)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	src.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("copy ended with %v, want net.ErrClosed", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("copy still waiting after its source was closed")
	}
}
