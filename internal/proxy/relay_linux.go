//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Relay moves the bytes of logged-in sessions between client and backend
// sockets without a goroutine per session. After login a session is nothing
// but two sockets and a few hundred bytes of state: the Relay takes the
// sockets over (duplicates their descriptors and closes the net.Conns), and a
// few event loops, each an epoll instance, splice(2) whatever becomes
// readable to the other side through a pipe of their own.
//
// Invariants:
//   - each loop's pipe is empty between two events: bytes spliced in are
//     spliced out, and what the destination cannot take now is read back out
//     of the pipe into the pair's pending buffer (at most one chunk);
//   - a direction with pending bytes does not read (backpressure): its
//     source leaves EPOLLIN and its destination waits for EPOLLOUT;
//   - a pair's state is touched only by its loop's goroutine, except the
//     stop request, which is queued and signalled through an eventfd;
//   - a pair ends exactly once; its descriptors are removed from epoll and
//     closed by the loop before its end callback runs (on a new goroutine).
//
// The loops do not block in epoll_wait(2) themselves: each epoll descriptor
// is registered in Go's own network poller, so a loop waits like any
// goroutine reading a socket and costs no thread while idle.
type Relay struct {
	log   *slog.Logger
	loops []*relayLoop
	next  atomic.Uint32
}

// RelayOptions configure NewRelay.
type RelayOptions struct {
	// Loops is the number of event loops (default: one per four CPUs, at
	// least one). One loop moves well over a gigabyte per second.
	Loops int
	// Chunk is the most a direction moves per readiness event, and the size
	// asked for the loops' pipes (default 1 MiB: bulk transfers take fewer
	// system calls and wake-ups). A direction whose destination once could
	// not take a whole chunk moves at most slowChunk from then on, so a slow
	// client holds little of the relay's memory.
	Chunk  int
	Logger *slog.Logger
}

// slowChunk bounds what a direction with a slow destination reads at once
// (what a pipe holds by default).
const slowChunk = 64 << 10

// NewRelay starts the event loops. Close stops them.
func NewRelay(o RelayOptions) (*Relay, error) {
	if o.Loops <= 0 {
		o.Loops = max(1, (runtime.GOMAXPROCS(0)+3)/4)
	}
	if o.Chunk <= 0 {
		o.Chunk = 1 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	r := &Relay{log: o.Logger}
	for range o.Loops {
		l, err := newRelayLoop(o.Chunk, o.Logger)
		if err != nil {
			r.Close()
			return nil, err
		}
		r.loops = append(r.loops, l)
		go l.run()
	}
	return r, nil
}

// Close stops the loops. Pairs still relayed are ended with reason
// "shutdown" first (normally the servers have drained them already).
func (r *Relay) Close() error {
	for _, l := range r.loops {
		l.close()
	}
	return nil
}

// pairs returns the number of sessions being relayed (tests).
func (r *Relay) pairs() int {
	n := 0
	for _, l := range r.loops {
		l.mu.Lock()
		n += l.npairs
		l.mu.Unlock()
	}
	return n
}

// relayable reports whether c is a plain socket the Relay can take over.
func relayable(c net.Conn) bool { return isSocket(c) }

// dupConn returns a close-on-exec duplicate of c's descriptor. It shares
// the open file (and so O_NONBLOCK) with c but is not in Go's poller.
func dupConn(c net.Conn) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, errors.New("relay: not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("relay: %w", err)
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) {
		fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, fmt.Errorf("relay: %w", err)
	}
	if derr != nil {
		return -1, fmt.Errorf("relay: dup: %w", derr)
	}
	return fd, nil
}

// take hands client and backend to a loop. On success the net.Conns are
// closed (their duplicates live on in the loop) and onEnd runs once, on a
// goroutine of its own, when the pair has ended; stop asks for an early
// end with the given reason. On error nothing changed: the caller still
// owns both connections.
func (r *Relay) take(client, backend net.Conn, onEnd func(reason string, in, out int64)) (stop func(reason string), err error) {
	cfd, err := dupConn(client)
	if err != nil {
		return nil, err
	}
	bfd, err := dupConn(backend)
	if err != nil {
		unix.Close(cfd)
		return nil, err
	}
	l := r.loops[int(r.next.Add(1))%len(r.loops)]
	p := &relayPair{fd: [2]int{cfd, bfd}, first: -1, onEnd: onEnd}
	if err := l.add(p); err != nil {
		unix.Close(cfd)
		unix.Close(bfd)
		return nil, err
	}
	// The loop may already be moving bytes; closing the originals only
	// removes them from Go's poller.
	client.Close()
	backend.Close()
	return func(reason string) { l.stop(p, reason) }, nil
}

// relayPair is one session: fd[0] the client, fd[1] the backend. Index d
// names a direction by its source: pend[d] holds bytes read from fd[d] that
// fd[1-d] could not take yet.
type relayPair struct {
	fd    [2]int
	pend  [2][]byte
	eof   [2]bool  // fd[d]'s read side reached end of file
	slow  [2]bool  // fd[1-d] once could not take what fd[d] sent
	moved [2]int64 // bytes moved from fd[d] to the other side
	want  [2]uint32
	first int // side whose end came first (-1: none yet)
	// stopReason is set by stop; ended when the loop ended the pair.
	stopReason string
	ended      bool
	grace      *time.Timer
	onEnd      func(reason string, in, out int64)
}

type relayLoop struct {
	log   *slog.Logger
	chunk int
	epfd  int
	efd   int      // eventfd: stop requests and close
	ep    *os.File // epfd in Go's poller
	pipe  [2]int

	mu      sync.Mutex
	pairs   map[int]*relayPair // by both descriptors
	npairs  int
	stops   []*relayPair
	closing bool
	done    chan struct{}

	events  []unix.EpollEvent
	scratch []*relayPair
}

func newRelayLoop(chunk int, log *slog.Logger) (l *relayLoop, err error) {
	l = &relayLoop{log: log, chunk: chunk, epfd: -1, efd: -1, pipe: [2]int{-1, -1},
		pairs: map[int]*relayPair{}, done: make(chan struct{}), events: make([]unix.EpollEvent, 128)}
	defer func() {
		if err != nil {
			l.closeFDs()
		}
	}()
	if l.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("relay: epoll_create1: %w", err)
	}
	if l.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, fmt.Errorf("relay: eventfd: %w", err)
	}
	if err = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, l.efd,
		&unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(l.efd)}); err != nil {
		return nil, fmt.Errorf("relay: epoll_ctl eventfd: %w", err)
	}
	var p [2]int
	if err = unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, fmt.Errorf("relay: pipe2: %w", err)
	}
	l.pipe = p
	// A bigger pipe means fewer splices per megabyte; the kernel may refuse
	// (fs.pipe-max-size), and then the chunk is what the pipe holds.
	if n, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, chunk); err == nil {
		l.chunk = n
	} else if n, err := unix.FcntlInt(uintptr(p[1]), unix.F_GETPIPE_SZ, 0); err == nil {
		l.chunk = min(chunk, n)
	}
	if err = unix.SetNonblock(l.epfd, true); err != nil {
		return nil, fmt.Errorf("relay: %w", err)
	}
	l.ep = os.NewFile(uintptr(l.epfd), "relay-epoll") // owns epfd from here
	return l, nil
}

func (l *relayLoop) closeFDs() {
	if l.ep != nil {
		l.ep.Close()
	} else if l.epfd >= 0 {
		unix.Close(l.epfd)
	}
	for _, fd := range []int{l.efd, l.pipe[0], l.pipe[1]} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

func (l *relayLoop) add(p *relayPair) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing {
		return errors.New("relay: closed")
	}
	l.pairs[p.fd[0]] = p
	l.pairs[p.fd[1]] = p
	l.npairs++
	for i, fd := range p.fd {
		p.want[i] = unix.EPOLLIN | unix.EPOLLRDHUP
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: p.want[i], Fd: int32(fd)}); err != nil {
			if i == 1 {
				_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, p.fd[0], nil)
			}
			delete(l.pairs, p.fd[0])
			delete(l.pairs, p.fd[1])
			l.npairs--
			return fmt.Errorf("relay: epoll_ctl: %w", err)
		}
	}
	return nil
}

// stop queues an early end of p; the first reason wins.
func (l *relayLoop) stop(p *relayPair, reason string) {
	l.mu.Lock()
	if p.ended || p.stopReason != "" || l.closing {
		l.mu.Unlock()
		return
	}
	p.stopReason = reason
	l.stops = append(l.stops, p)
	l.mu.Unlock()
	l.wake()
}

func (l *relayLoop) wake() {
	var one = [8]byte{1}
	_, _ = unix.Write(l.efd, one[:])
}

func (l *relayLoop) close() {
	l.mu.Lock()
	if l.closing {
		l.mu.Unlock()
		return
	}
	l.closing = true
	l.mu.Unlock()
	l.wake()
	<-l.done
	l.closeFDs()
}

// run is the loop: wait until the epoll descriptor is readable (in Go's
// poller), then handle every ready event without blocking.
func (l *relayLoop) run() {
	defer close(l.done)
	rc, err := l.ep.SyscallConn()
	if err != nil {
		l.log.Error("relay loop cannot start", "err", err)
		return
	}
	exit := false
	for !exit {
		err := rc.Read(func(uintptr) bool {
			n, err := rawEpollPoll(l.epfd, l.events)
			if err != nil && err != unix.EINTR {
				l.log.Error("relay: epoll_wait", "err", err)
				exit = true
				return true
			}
			if n <= 0 {
				return false // nothing ready: park in Go's poller
			}
			exit = l.handle(l.events[:n])
			return true
		})
		if err != nil {
			l.log.Error("relay: wait", "err", err)
			exit = true
		}
	}
	// Closing: end what is left.
	l.mu.Lock()
	var left []*relayPair
	for fd, p := range l.pairs {
		if fd == p.fd[0] {
			left = append(left, p)
		}
	}
	l.mu.Unlock()
	for _, p := range left {
		l.end(p, relayShutdown)
	}
}

// handle processes one batch of events; it reports whether the loop must
// exit.
func (l *relayLoop) handle(evs []unix.EpollEvent) (exit bool) {
	l.mu.Lock()
	l.scratch = l.scratch[:0]
	for i := range evs {
		if int(evs[i].Fd) == l.efd {
			continue
		}
		l.scratch = append(l.scratch, l.pairs[int(evs[i].Fd)])
	}
	l.mu.Unlock()
	next := 0
	for i := range evs {
		ev := &evs[i]
		fd := int(ev.Fd)
		if fd == l.efd {
			var b [8]byte
			_, _ = rawRead(l.efd, b[:])
			if l.stopRequested() {
				return true
			}
			continue
		}
		p := l.scratch[next]
		next++
		if p == nil || p.ended {
			continue // ended earlier in this batch
		}
		side := 0
		if p.fd[1] == fd {
			side = 1
		} else if p.fd[0] != fd {
			continue // a stale event for a reused descriptor number
		}
		l.event(p, side, ev.Events)
	}
	return false
}

// stopRequested ends the pairs whose stop was asked for and reports whether
// the loop is closing.
func (l *relayLoop) stopRequested() bool {
	l.mu.Lock()
	stops := l.stops
	l.stops = nil
	closing := l.closing
	l.mu.Unlock()
	for _, p := range stops {
		if !p.ended {
			l.end(p, p.stopReason)
		}
	}
	return closing
}

// event handles readiness of p.fd[side].
func (l *relayLoop) event(p *relayPair, side int, ev uint32) {
	if ev&unix.EPOLLERR != 0 {
		l.failed(p, side)
		return
	}
	if ev&unix.EPOLLOUT != 0 && len(p.pend[1-side]) > 0 {
		l.flush(p, 1-side)
		if p.ended {
			return
		}
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 && !p.eof[side] && len(p.pend[side]) == 0 {
		l.pump(p, side)
		if p.ended {
			return
		}
	}
	if ev&unix.EPOLLHUP != 0 && p.eof[side] {
		// Both halves of this socket are shut: its peer is gone, nothing
		// more can be written to it.
		l.failed(p, side)
		return
	}
	l.interest(p)
}

// pump moves one chunk from fd[d] to fd[1-d].
func (l *relayLoop) pump(p *relayPair, d int) {
	chunk := l.chunk
	if p.slow[d] {
		chunk = min(chunk, slowChunk)
	}
	n, err := rawSplice(p.fd[d], l.pipe[1], chunk)
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return
	case err != nil:
		l.failed(p, d)
		return
	case n == 0:
		l.gotEOF(p, d)
		return
	}
	p.moved[d] += int64(n)
	left := int(n)
	for left > 0 {
		m, err := rawSplice(l.pipe[0], p.fd[1-d], left)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			l.drainPipe(left)
			l.failed(p, 1-d)
			return
		}
		left -= int(m)
	}
	if left > 0 {
		// The destination is full: keep the rest here and stop reading
		// from the source until it is written (backpressure).
		p.pend[d] = l.drainPipe(left)
		p.slow[d] = true
	}
}

// drainPipe reads n bytes out of the pipe (they are there already).
func (l *relayLoop) drainPipe(n int) []byte {
	b := make([]byte, n)
	for off := 0; off < n; {
		m, err := rawRead(l.pipe[0], b[off:])
		if err == unix.EINTR {
			continue
		}
		if err != nil || m <= 0 {
			// Cannot happen with the bytes in the pipe; never leave the
			// shared pipe dirty.
			panic(fmt.Sprintf("relay: pipe read %d of %d bytes: %v", off, n, err))
		}
		off += m
	}
	return b
}

// flush writes pending bytes of direction d to fd[1-d].
func (l *relayLoop) flush(p *relayPair, d int) {
	for len(p.pend[d]) > 0 {
		m, err := rawWrite(p.fd[1-d], p.pend[d])
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return
		}
		if err != nil {
			l.failed(p, 1-d)
			return
		}
		p.pend[d] = p.pend[d][m:]
	}
	p.pend[d] = nil
	if p.eof[d] {
		l.shutWrite(p, 1-d)
	}
}

// gotEOF handles the end of fd[d]'s input: the peer on the other side sees
// end of file too (half-close), and the other direction goes on.
func (l *relayLoop) gotEOF(p *relayPair, d int) {
	p.eof[d] = true
	if p.first < 0 {
		p.first = d
	}
	l.shutWrite(p, 1-d)
	if p.ended {
		return
	}
	if p.eof[1-d] {
		l.end(p, "")
		return
	}
	if d == 1 {
		// The backend is gone: a client that vanished without closing must
		// not hold the session open.
		p.grace = time.AfterFunc(backendGoneGrace, func() { l.stop(p, "backend closed") })
	}
}

func (l *relayLoop) shutWrite(p *relayPair, i int) {
	if err := rawShutdownWrite(p.fd[i]); err != nil && err != unix.ENOTCONN {
		l.failed(p, i)
	}
}

// failed ends p after an error on fd[side].
func (l *relayLoop) failed(p *relayPair, side int) {
	if p.first < 0 {
		p.first = side
	}
	l.end(p, "")
}

// interest updates the epoll registrations to what p needs now.
func (l *relayLoop) interest(p *relayPair) {
	for i := range 2 {
		var w uint32
		if !p.eof[i] && len(p.pend[i]) == 0 {
			w |= unix.EPOLLIN | unix.EPOLLRDHUP
		}
		if len(p.pend[1-i]) > 0 {
			w |= unix.EPOLLOUT
		}
		if w != p.want[i] {
			p.want[i] = w
			if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, p.fd[i], &unix.EpollEvent{Events: w, Fd: int32(p.fd[i])}); err != nil {
				l.log.Error("relay: epoll_ctl", "err", err)
				l.failed(p, i)
				return
			}
		}
	}
}

// end removes p from the loop, closes its sockets and runs its callback.
// An empty reason is derived from the side that ended first.
func (l *relayLoop) end(p *relayPair, reason string) {
	if p.ended {
		return
	}
	if reason == "" {
		reason = "backend closed"
		if p.first == 0 {
			reason = "client closed"
		}
	}
	l.mu.Lock()
	p.ended = true
	delete(l.pairs, p.fd[0])
	delete(l.pairs, p.fd[1])
	l.npairs--
	l.mu.Unlock()
	if p.grace != nil {
		p.grace.Stop()
	}
	for _, fd := range p.fd {
		// Removed explicitly: the net.Conn's descriptor for the same socket
		// may not be closed yet when a pair ends at once.
		_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
		rawClose(fd)
	}
	in, out := p.moved[0]-int64(len(p.pend[0])), p.moved[1]-int64(len(p.pend[1]))
	p.pend = [2][]byte{}
	go p.onEnd(reason, in, out)
}
