package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os/signal"
	"strings"
	"syscall"

	"github.com/usher-mail/usher/internal/bench"
)

// benchCmd runs `usher bench` (package bench). SIGINT or SIGTERM stops the
// run early and the summary is still printed; a second signal kills.
func benchCmd(args []string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // restore the default action for a second signal
	err := bench.Command(ctx, args, stdout, stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return nil // bench.Command printed its own usage
	case errors.Is(err, bench.ErrUsage):
		msg := strings.TrimPrefix(err.Error(), bench.ErrUsage.Error()+": ")
		return fmt.Errorf("%w: %s (see usher bench --help)", errUsage, msg)
	}
	return err
}
