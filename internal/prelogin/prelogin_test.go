package prelogin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"

	"github.com/usher-mail/usher/internal/proxy"
)

func TestShutdownErr(t *testing.T) {
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(proxy.ErrLoginTimeout)
	if err := ShutdownErr(ctx); !errors.Is(err, ErrLoginTimeout) {
		t.Errorf("cancelled for the login timeout: %v, want ErrLoginTimeout", err)
	}
	ctx, cancel = context.WithCancelCause(context.Background())
	cancel(nil)
	if err := ShutdownErr(ctx); !errors.Is(err, ErrShutdown) {
		t.Errorf("cancelled: %v, want ErrShutdown", err)
	}
}

func TestEndReason(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("write reply: %w", ErrClientWrite), "client write failed"},
		{ErrClientGone, "client closed"},
		{fmt.Errorf("read: %w", io.EOF), "client closed"},
		{io.ErrUnexpectedEOF, "client closed"},
		{&net.OpError{Op: "read", Err: net.ErrClosed}, "client closed"},
		{io.ErrClosedPipe, "client closed"},
		{fmt.Errorf("login: %w", &SessionEnd{Reason: "logout"}), "logout"},
		{&net.OpError{Op: "read", Err: syscall.ECONNRESET}, "client read failed"},
		{errors.New("something else"), "client read failed"},
	} {
		if got := EndReason(c.err); got != c.want {
			t.Errorf("EndReason(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}
