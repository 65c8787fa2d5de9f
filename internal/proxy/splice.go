package proxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Splice copies bytes both ways between client and backend until both
// directions are finished, the context ends, or the lease is kicked (kick,
// move). clientPending and backendPending are bytes already read into
// protocol buffers that must be forwarded first (pipelined commands, early
// data).
//
// No per-byte work happens in Go: io.Copy between two *net.TCPConn uses
// splice(2) on Linux. When one side half-closes, the other side's write half
// is closed so the peer sees EOF (half-close), and the copy the other way
// continues. Byte counts are added to s when each direction ends.
//
// When the session has a Relay and both connections are plain sockets (no
// TLS layer), Splice hands them to the Relay and returns at once: the
// session then costs no goroutine at all, the Relay releases the lease, and
// the session ends (log line, metrics, limits) when the Relay is done with
// it, not when the Handler returns. Otherwise an idle spliced session costs
// two goroutines, one per direction (copyConn keeps their buffers small);
// for a session run by a Server they are fresh ones and Splice returns at
// once too, else the caller's is one of them and Splice returns at the end.
// Either way the context and the kick are watched with context.AfterFunc,
// not by a goroutine of their own.
func Splice(ctx context.Context, s *Session, client net.Conn, clientPending []byte,
	backend net.Conn, backendPending []byte, lease *Lease) (reason string) {
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
	// From here on the sockets themselves (a PROXY-protocol client once the
	// bytes that came with the header are consumed), so that the Relay can
	// take them and io.Copy splice them.
	client, backend = unwrapConn(client), unwrapConn(backend)
	// Splice has no per-read deadlines; the copies end on EOF, on error or when
	// the connections are closed below.
	_ = client.SetDeadline(noDeadline)
	_ = backend.SetDeadline(noDeadline)
	if s.relay != nil && s.finish != nil && lease != nil {
		if relayable(client) && relayable(backend) && relay(ctx, s, client, backend, lease) {
			return ""
		}
	}
	if s.finish != nil && lease != nil {
		// A session run by a Server: the copying moves to fresh goroutines
		// and the caller's, whose stack grew through the login (a TLS
		// handshake most of all), ends now. The session ends when they do.
		lease.detached.Store(true)
		s.detached = true
		go func() {
			reason := copyBoth(ctx, s, client, backend, lease)
			lease.releaseNow()
			s.finish(reason)
		}()
		return ""
	}
	return copyBoth(ctx, s, client, backend, lease)
}

// copyBoth copies both ways on two goroutines (the caller's and one more)
// until both directions are finished, the context ends or the lease is
// kicked, and returns the end reason.
func copyBoth(ctx context.Context, s *Session, client, backend net.Conn, lease *Lease) (reason string) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			client.Close()
			backend.Close()
		})
	}
	const (
		stopShutdown = 1
		stopKicked   = 2
	)
	var stopped atomic.Int32
	stopCtx := context.AfterFunc(ctx, func() {
		stopped.CompareAndSwap(0, stopShutdown)
		closeBoth()
	})
	defer stopCtx()
	stopKick := lease.afterKick(func() {
		stopped.CompareAndSwap(0, stopKicked)
		closeBoth()
	})
	defer stopKick()

	// firstEnded records which direction's copy returned first. It is set
	// before closeWrite forwards the end to the peer, whose reaction may end
	// the other direction before this one reports.
	var firstEnded atomic.Int32 // 0 unset, 1 client->backend, 2 backend->client
	upErr := make(chan error, 1)
	go func() {
		n, err := copyConn(backend, client)
		firstEnded.CompareAndSwap(0, 1)
		s.BytesIn.Add(n)
		closeWrite(backend)
		upErr <- err
	}()
	n, err := copyConn(client, backend)
	if firstEnded.CompareAndSwap(0, 2) {
		// The backend is gone: a client that vanished without closing
		// must not hold the session open, so its remaining input gets
		// a short grace period.
		_ = client.SetReadDeadline(time.Now().Add(backendGoneGrace))
	}
	s.BytesOut.Add(n)
	closeWrite(client)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		closeBoth() // a failed direction ends the session
	}
	if err := <-upErr; err != nil && !errors.Is(err, net.ErrClosed) {
		closeBoth()
	}
	closeBoth()
	switch stopped.Load() {
	case stopShutdown:
		return "shutdown"
	case stopKicked:
		return "kicked"
	}
	if firstEnded.Load() == 1 {
		return "client closed"
	}
	return "backend closed"
}

// relay hands the session to s.relay; false means it could not and the
// caller still owns everything.
func relay(ctx context.Context, s *Session, client, backend net.Conn, lease *Lease) bool {
	lease.detached.Store(true)
	var stopCtx, stopKick func() bool
	var ready sync.WaitGroup // the watchers are set before the end can use them
	ready.Add(1)
	stop, err := s.relay.take(client, backend, func(reason string, in, out int64) {
		ready.Wait()
		stopCtx()
		stopKick()
		s.BytesIn.Add(in)
		s.BytesOut.Add(out)
		lease.releaseNow()
		s.finish(reason)
	})
	if err != nil {
		lease.detached.Store(false)
		if s.Log != nil {
			s.Log.Warn("relay refused the session; copying with goroutines", "err", err)
		}
		return false
	}
	s.detached = true
	stopCtx = context.AfterFunc(ctx, func() { stop(relayShutdown) })
	k := lease.afterKick(func() { stop(relayKicked) })
	stopKick = func() bool { k(); return true }
	ready.Done()
	return true
}

// relay stop reasons, as the session's end log line gives them.
const (
	relayShutdown = "shutdown"
	relayKicked   = "kicked"
)

// backendGoneGrace is how long a client may keep sending after the backend
// closed its side.
const backendGoneGrace = 10 * time.Second

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
