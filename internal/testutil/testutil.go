// Package testutil holds the helpers usher's package tests share: log
// capture, a throwaway PKI for TLS on loopback addresses, loopback TCP
// connections and listeners, an in-memory connection for fuzzing, and a
// line-protocol test client.
//
// It is imported only from _test.go files and depends on the standard
// library alone, so every package can use it, proxy's own tests included
// (helpers that need proxy's types are in proxytest).
//
// Invariants: servers bind to 127.0.0.0/8 only; every blocking step has a
// deadline (DefaultTimeout unless said otherwise), so a bug fails a test
// instead of hanging it; everything started is stopped at the test's
// cleanup.
package testutil

import (
	"bytes"
	"io"
	"log/slog"
	"sync"
	"time"
)

// DefaultTimeout bounds every blocking step of a helper.
const DefaultTimeout = 5 * time.Second

// LogBuffer collects log output; it is safe for a logger writing from many
// goroutines and a test reading at the same time.
type LogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// String returns everything written so far.
func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// NewLogger returns a debug-level text logger writing to w.
func NewLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// CaptureLog returns a debug-level text logger and the buffer it writes to.
func CaptureLog() (*slog.Logger, *LogBuffer) {
	b := &LogBuffer{}
	return NewLogger(b), b
}
