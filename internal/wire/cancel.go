package wire

import (
	"context"
	"net"
	"time"
)

// Cancellation of reads. A Reader sets a fresh deadline before every read,
// so a deadline set to end a blocked read when a session is shut down would
// be undone by the next read. NewReaderContext and WatchContext together make
// a shutdown stick: the watch ends a read under way, the guard keeps every
// later deadline in the past.

// PastDeadline returns a deadline in the past: set on a connection, it makes
// a blocked read (or write) return at once.
func PastDeadline() time.Time { return time.Unix(1, 0) }

// NewReaderContext returns a Reader on conn, like NewReader, whose read
// deadlines stay in the past once ctx has ended.
func NewReaderContext(ctx context.Context, conn net.Conn, timeout time.Duration, maxLine int) *Reader {
	return NewReader(guardedConn{Conn: conn, ctx: ctx}, timeout, maxLine)
}

// guardedConn keeps read deadlines in the past once ctx has ended.
type guardedConn struct {
	net.Conn
	ctx context.Context
}

func (g guardedConn) SetReadDeadline(t time.Time) error {
	if g.ctx.Err() != nil {
		t = PastDeadline()
	}
	return g.Conn.SetReadDeadline(t)
}

// WatchContext makes a read blocked on conn return when ctx ends, by
// setting a read deadline in the past; writes are left alone, so a goodbye
// can still be sent. Watch the connection under any TLS layer, which a
// later STARTTLS leaves in place. stop ends the watch and reports whether
// it did so before ctx ended (as context.AfterFunc's stop).
func WatchContext(ctx context.Context, conn net.Conn) (stop func() bool) {
	return context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(PastDeadline()) })
}
