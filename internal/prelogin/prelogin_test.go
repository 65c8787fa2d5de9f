package prelogin

import (
	"context"
	"errors"
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
