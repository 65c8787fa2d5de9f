// Package proxytest helps test proxy.Handler front ends (imap, pop3, lmtp,
// sieve): a fake proxy.Director that counts its leases, and a harness that
// runs a Handler's Serve on a loopback TCP session with a test client.
//
// It is imported only from _test.go files (never from proxy's own tests,
// which it would cycle with). Invariants: the harness binds to 127.0.0.1
// only, every wait is bounded by the session's Timeout, and Serve is
// cancelled and awaited when the test ends.
package proxytest

import (
	"context"
	"net/netip"
	"sync"

	"github.com/usher-mail/usher/internal/proxy"
)

// Director is a fake proxy.Director. It sends every user to one backend
// unless routed elsewhere, fails as told, records every Acquire and counts
// the leases it handed out and got back. It is safe for concurrent use.
type Director struct {
	mu       sync.Mutex
	def      netip.Addr
	routes   map[string]netip.Addr
	fail     map[string]error
	err      error
	done     <-chan struct{}
	users    []string
	acquired int
	released int
}

var _ proxy.Director = (*Director)(nil)

// NewDirector returns a Director sending every user to backend.
func NewDirector(backend netip.Addr) *Director {
	return &Director{def: backend, routes: map[string]netip.Addr{}, fail: map[string]error{}}
}

// Acquire records user and returns a lease on its backend, or the error
// set by SetErr or FailUser.
func (d *Director) Acquire(_ context.Context, user string) (*proxy.Lease, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.users = append(d.users, user)
	if d.err != nil {
		return nil, d.err
	}
	if err := d.fail[user]; err != nil {
		return nil, err
	}
	ip, ok := d.routes[user]
	if !ok {
		ip = d.def
	}
	d.acquired++
	return proxy.NewLease(user, ip, d.done, func() {
		d.mu.Lock()
		d.released++
		d.mu.Unlock()
	}), nil
}

// SetErr makes every Acquire fail with err (nil: succeed again).
func (d *Director) SetErr(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.err = err
}

// FailUser makes Acquire fail for user.
func (d *Director) FailUser(user string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.fail[user] = err
}

// Route sends user to ip.
func (d *Director) Route(user string, ip netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.routes[user] = ip
}

// SetDone sets the Done channel of the leases handed out from now on (the
// Director's kick; nil: never).
func (d *Director) SetDone(done <-chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.done = done
}

// Users returns the users of every Acquire so far, failed ones included,
// in order.
func (d *Director) Users() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.users...)
}

// Acquired is the number of leases handed out.
func (d *Director) Acquired() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.acquired
}

// Released is the number of leases released.
func (d *Director) Released() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.released
}

// Held is the number of leases handed out and not yet released.
func (d *Director) Held() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.acquired - d.released
}

// Counts returns Acquired, Released and Users at one instant.
func (d *Director) Counts() (acquired, released int, users []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.acquired, d.released, append([]string(nil), d.users...)
}
