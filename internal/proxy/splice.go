package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
)

// Splice copies bytes both ways between client and backend until both
// directions are finished, the context ends, or done is closed (kick/move).
// clientPending and backendPending are bytes already read into protocol
// buffers that must be forwarded first (pipelined commands, early data).
//
// No per-byte work happens in Go: io.Copy between two *net.TCPConn uses
// splice(2) on Linux. When one side half-closes, the other side's write half
// is closed so the peer sees EOF (half-close), and the copy the other way
// continues. Byte counts are added to s when each direction ends.
func Splice(ctx context.Context, s *Session, client net.Conn, clientPending []byte,
	backend net.Conn, backendPending []byte, done <-chan struct{}) (reason string) {
	if len(clientPending) > 0 {
		n, err := backend.Write(clientPending)
		s.BytesIn.Add(int64(n))
		if err != nil {
			return "backend write failed"
		}
	}
	if len(backendPending) > 0 {
		n, err := client.Write(backendPending)
		s.BytesOut.Add(int64(n))
		if err != nil {
			return "client write failed"
		}
	}
	// Splice has no per-read deadlines; the copies end on EOF, on error or when
	// the connections are closed below.
	_ = client.SetDeadline(noDeadline)
	_ = backend.SetDeadline(noDeadline)

	type result struct {
		fromClient bool
		err        error
	}
	results := make(chan result, 2)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		n, err := io.Copy(backend, client)
		s.BytesIn.Add(n)
		closeWrite(backend)
		results <- result{true, err}
	}()
	go func() {
		defer wg.Done()
		n, err := io.Copy(client, backend)
		s.BytesOut.Add(n)
		closeWrite(client)
		results <- result{false, err}
	}()

	closeBoth := func() {
		client.Close()
		backend.Close()
	}
	var first result
	got := 0
	for got < 2 {
		select {
		case r := <-results:
			got++
			if got == 1 {
				first = r
			}
			if r.err != nil && !errors.Is(r.err, net.ErrClosed) {
				closeBoth() // a failed direction ends the session
			}
		case <-ctx.Done():
			closeBoth()
			wg.Wait()
			return "shutdown"
		case <-done:
			closeBoth()
			wg.Wait()
			return "kicked"
		}
	}
	closeBoth()
	if first.fromClient {
		return "client closed"
	}
	return "backend closed"
}

// closeWrite half-closes c's write side when the connection type supports it,
// else closes it.
func closeWrite(c net.Conn) {
	type closeWriter interface{ CloseWrite() error }
	if cw, ok := c.(closeWriter); ok {
		_ = cw.CloseWrite()
		return
	}
	c.Close()
}
