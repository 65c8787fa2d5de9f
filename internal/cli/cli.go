// Package cli implements the usher command line: `usher serve` runs the
// director, the other subcommands are clients of its admin socket.
//
// Invariants: every subcommand returns an exit code (0 ok, 1 failure, 2
// usage error) instead of calling os.Exit, so it can be tested in process;
// errors go to stderr, results to stdout.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

const usage = `usage: usher <command> [flags] [args]

commands:
  serve   --config FILE                run the director
  status  [--json] [USER]              backends, or one user's record
  backend add ADDR [--weight N] [--tag T]
                                       add a backend (live users stay put)
  version                              print the version

Client commands find the admin socket with --socket PATH, else $USHER_SOCKET,
else the [admin] socket of --config FILE (default /etc/usher/usher.toml).
`

// Version is set at build time with -ldflags "-X ...cli.Version=...".
var Version = "dev"

// errUsage marks command-line mistakes (exit code 2).
var errUsage = errors.New("usage")

// Main runs the command line and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = serve(args[1:], stderr)
	case "status":
		err = status(args[1:], stdout)
	case "backend":
		err = backend(args[1:], stdout)
	case "version", "--version":
		fmt.Fprintln(stdout, "usher", Version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		err = fmt.Errorf("%w: unknown command %q", errUsage, args[0])
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "usher: %v\n\n%s", err, usage)
		return 2
	default:
		fmt.Fprintf(stderr, "usher: %v\n", err)
		return 1
	}
}

// parseInterspersed parses flags that may come before or after positional
// arguments (`usher status USER --json`).
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// socketFlags are the flags every client command has.
type socketFlags struct {
	socket, config string
}

func (s *socketFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&s.socket, "socket", os.Getenv("USHER_SOCKET"), "admin socket path")
	fs.StringVar(&s.config, "config", "/etc/usher/usher.toml", "config file (to find the admin socket)")
}

func (s *socketFlags) path() (string, error) {
	if s.socket != "" {
		return s.socket, nil
	}
	cfg, err := loadConfig(s.config)
	if err != nil {
		return "", fmt.Errorf("find admin socket: %w (or pass --socket)", err)
	}
	return cfg.Admin.Socket, nil
}
