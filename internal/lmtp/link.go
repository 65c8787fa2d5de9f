package lmtp

import (
	"context"
	"net/netip"
	"sync"
	"time"
)

// Backend connection reuse. RFC 5321 section 4.1.1.4 (and RFC 2033 section
// 4.2 for LMTP): once the replies to the end of the mail data are sent, the
// receiver has cleared its transaction state and waits for the next MAIL, so
// one LMTP connection to a backend carries any number of transactions. A
// session therefore keeps its backend connections ("links") across its
// transactions, at most one per backend address, and closes them at the end
// of the session, when the client says LHLO or STARTTLS again (the XCLIENT
// attributes, which include the client's LHLO name, are per connection),
// after linkIdle without use, after linkMaxTxns transactions, and at once
// after any error on them.
//
// Ownership: while a transaction uses a link, its leg owns it and the link
// is not in session.links; between transactions the link is in
// session.links and its idle timer owns it. Taking it out stops the timer;
// when the timer has already fired, the timer's goroutine is closing the
// link and the session forgets it.

const (
	// linkIdle closes a cached backend connection unused that long. Reuse
	// pays off for transactions that follow each other closely; an idle
	// connection holds a backend process (Dovecot's lmtp service has
	// client_limit = 1), so the cache is short-lived, like Postfix's own
	// connection cache (smtp_connection_cache_time_limit, 2s). It is far
	// below Dovecot's LMTP idle timeout (5 minutes,
	// CLIENT_IDLE_TIMEOUT_MSECS in lmtp's client.c), so that normally usher,
	// not the backend, ends an idle connection.
	linkIdle = 5 * time.Second
	// linkMaxTxns retires a backend connection after that many
	// transactions.
	linkMaxTxns = 1000
	// dataWaitMax bounds how long a backend may have waited for the message
	// since usher last wrote to it (the RCPTs, or DATA, which usher sends at
	// the client's DATA so that the message can follow without a round
	// trip), while the client sent the message: a backend that waited
	// longer may be timing the connection out, and the envelope is replayed
	// on a new one before the message is sent (see leg.deliver). Well below
	// Dovecot's 5-minute idle timeout.
	dataWaitMax = time.Minute
)

// link is a connection to one backend that outlives a transaction.
type link struct {
	ip    netip.Addr
	b     *backendConn
	stop  func() bool // ends the shutdown watch (context.AfterFunc)
	idle  *time.Timer // closes the link when unused; armed while cached
	txns  int         // transactions started on it
	dirty bool        // a backend transaction may be open: RSET before MAIL
}

// dialLink connects to the backend at ip and runs the handshake (see
// connect). A shutdown (ctx ending) closes the connection, so that no read
// or write on it blocks. It reads only immutable session state and may run
// in any goroutine.
func (s *Server) dialLink(ctx context.Context, c *session, ip netip.Addr) (*link, error) {
	b, err := s.connect(ctx, c, ip)
	if err != nil {
		return nil, err
	}
	b.setTimeout(s.loginTimeout()) // envelope replies; the message gets DataTimeout
	conn := b.conn
	l := &link{ip: ip, b: b}
	l.stop = context.AfterFunc(ctx, func() { conn.Close() })
	return l, nil
}

// close ends the link: with QUIT and a short wait for its reply (RFC 5321
// section 4.1.1.10) when polite, else by closing the connection, which is
// what any doubt about the state of the backend session calls for.
func (l *link) close(polite bool) {
	l.stop()
	if polite {
		l.b.quit()
		return
	}
	l.b.conn.Close()
}

// checkout takes the cached link to ip for a new transaction; nil when
// there is none that may be used.
func (c *session) checkout(ip netip.Addr) *link {
	l := c.links[ip]
	if l == nil {
		return nil
	}
	delete(c.links, ip)
	if !l.idle.Stop() {
		return nil // the idle timer is closing it
	}
	if l.txns >= c.srv.linkMaxTxns {
		l.close(true)
		return nil
	}
	return l
}

// park caches l after a transaction and arms its idle timer.
func (c *session) park(l *link) {
	if old := c.links[l.ip]; old != nil && old != l {
		// Cannot happen (one leg per backend, which owns the link); be safe.
		delete(c.links, l.ip)
		if old.idle.Stop() {
			old.close(false)
		}
	}
	if c.links == nil {
		c.links = make(map[netip.Addr]*link)
	}
	c.links[l.ip] = l
	if l.idle == nil {
		l.idle = time.AfterFunc(c.srv.linkIdle, func() { l.close(true) })
	} else {
		l.idle.Reset(c.srv.linkIdle)
	}
}

// closeLinks ends every cached link, with QUIT, all at once.
func (c *session) closeLinks() {
	if len(c.links) == 0 {
		return
	}
	var wg sync.WaitGroup
	for ip, l := range c.links {
		delete(c.links, ip)
		if l.idle.Stop() {
			wg.Go(func() { l.close(true) })
		}
	}
	wg.Wait()
}
