// Package proxy accepts client connections and hands them to protocol
// handlers: listeners (TCP, implicit TLS), session limits (per service and
// per client IP), the session record and its start/end log lines, the
// backend dialer, and the splice that joins client and backend after login.
//
// Invariants: every session is counted against the limits from accept to
// close and logged exactly once at start and once at end; a session's
// connections are closed when its handler returns or the server stops; a
// backend is always dialed on TCP at a configured, non-zero port.
package proxy
