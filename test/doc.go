// Package test is usher's end-to-end harness: it runs real Dovecot 2.3
// backends and a real usher binary and drives them with real clients.
//
// StartBackends starts N independent Dovecot instances (one config, base_dir,
// state_dir and log file each) on 127.0.1.1 … 127.0.1.N at Dovecot's standard
// ports (IMAP 143, POP3 110, LMTP 24, ManageSieve 4190, IMAPS 993, POP3S 995),
// all sharing one Maildir root, the way a director's backends share storage.
// LaunchUsher/StartUsher build and run `usher serve` against them, and the
// small IMAP/POP3 clients here hold sessions open while a test looks around.
//
// Invariants: every process the harness starts runs in its own process group
// and is killed with its whole group on Stop/Close (tests register Close with
// t.Cleanup), so a failing test leaves nothing behind; every network read has
// a deadline; the standard ports mean only one set of backends can run at a
// time on a machine, so tests of this package run one after another (never
// t.Parallel), StartBackends takes a machine-wide flock for the lifetime of
// the Backends (other test runs and the demo wait for it), and it refuses to
// start when a port is taken anyway (a system Dovecot, say).
//
// The harness needs root (Dovecot binds ports below 1024 and switches to the
// mail user); tests skip with a message when Dovecot or root is missing.
package test
