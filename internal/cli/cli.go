// Package cli implements the usher command line: `usher serve` runs the
// director, the other subcommands are clients of its admin API (the UNIX
// socket, or the TCP API with a bearer token).
//
// Invariants: every subcommand returns an exit code (0 ok, 1 failure, 2
// usage error) instead of calling os.Exit, so it can be tested in process;
// errors go to stderr, results to stdout; `--help` on any command prints
// the usage to stdout and exits 0.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/usher-mail/usher/internal/admin"
)

const usage = `usage: usher <command> [flags] [args]

commands:
  serve   --config FILE [--log-level L] [--log-format text|json]
                                       run the director
  status  [USER]                       backends with health and last change,
                                       or one user's record
  map     [--backend ADDR]             user records (USER HASH BACKEND TAG
                                       SESSIONS EXPIRES)
  backend add ADDR [--weight N] [--tag T]
                                       add a backend (live users stay put)
  backend update ADDR --weight N       change a weight (0 drains: no new users)
  backend remove ADDR                  move the backend's users off, remove it
  backend up ADDR                      mark up (health checks apply again)
  backend down ADDR [--cause TEXT]     mark down: its users are kicked and
                                       hashed afresh; health checks do not
                                       bring it back up
  user move USER BACKEND               kick the user's sessions, pin it to BACKEND
  user kick USER                       close the user's sessions (record stays)
  flush BACKEND|all [--max-parallel N] move the users of BACKEND (or all)
                                       whom hashing now puts elsewhere
  flush --forget BACKEND|all           drop the user records, kick nobody
  dump                                 print the commands that rebuild the
                                       backend set
  version                              print the version
  bench WORKLOAD [flags]               load generator: login, idle, fetch, lmtp
                                       against any IMAP/POP3/LMTP server (--help)

Client commands (all but serve, bench and version) talk to the admin API:
  --socket PATH   the admin socket; default $USHER_SOCKET, else the [admin]
                  socket of --config FILE (default /etc/usher/usher.toml)
  --address URL   the TCP API instead: http://HOST:PORT, token from
                  $USHER_TOKEN
  --json          print the API's JSON answer

Exit status: 0 ok, 1 failure (the API's error is printed), 2 usage error.
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
	case "map":
		err = userMap(args[1:], stdout)
	case "backend":
		err = backend(args[1:], stdout)
	case "user":
		err = user(args[1:], stdout)
	case "flush":
		err = flush(args[1:], stdout)
	case "dump":
		err = dump(args[1:], stdout)
	case "bench":
		err = benchCmd(args[1:], stdout, stderr)
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
		fmt.Fprint(stdout, usage)
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
// arguments (`usher status USER --json`). -h and --help return
// flag.ErrHelp; other mistakes are usage errors.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
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

// isHelp reports whether arg asks for help (`usher backend --help`).
func isHelp(arg string) bool {
	return arg == "-h" || arg == "-help" || arg == "--help" || arg == "help"
}

// clientFlags are the flags every client command has.
type clientFlags struct {
	socket, config, address string
	json                    bool
	socketSet, addressSet   bool
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.socket, "socket", os.Getenv("USHER_SOCKET"), "admin socket path")
	fs.StringVar(&c.config, "config", "/etc/usher/usher.toml", "config file (to find the admin socket)")
	fs.StringVar(&c.address, "address", "", "TCP admin API, http://HOST:PORT (token from $USHER_TOKEN)")
	fs.BoolVar(&c.json, "json", false, "print JSON")
}

// parse parses args (flags anywhere) and returns the positional arguments.
func (c *clientFlags) parse(fs *flag.FlagSet, args []string) ([]string, error) {
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, err
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "socket":
			c.socketSet = true
		case "address":
			c.addressSet = true
		}
	})
	if c.socketSet && c.addressSet {
		return nil, fmt.Errorf("%w: give --socket or --address, not both", errUsage)
	}
	return pos, nil
}

// client returns the API client the flags ask for: --address (TCP, token
// from $USHER_TOKEN), else the socket of --socket, $USHER_SOCKET or the
// config file.
func (c *clientFlags) client() (*admin.Client, error) {
	if c.addressSet {
		cl, err := admin.NewTCPClient(c.address, os.Getenv("USHER_TOKEN"))
		if err != nil {
			return nil, fmt.Errorf("%w: --address: %v", errUsage, err)
		}
		return cl, nil
	}
	if c.socket != "" {
		return admin.NewClient(c.socket), nil
	}
	cfg, err := loadConfig(c.config)
	if err != nil {
		return nil, fmt.Errorf("find admin socket: %w (or pass --socket)", err)
	}
	return admin.NewClient(cfg.Admin.Socket), nil
}
