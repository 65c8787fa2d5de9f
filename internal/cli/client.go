package cli

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/director"
	"github.com/usher-mail/usher/internal/state"
)

// command is one parsed client command: its flags, positional arguments
// and (once do is called) its API client.
type command struct {
	cf  clientFlags
	fs  *flag.FlagSet
	pos []string
	c   *admin.Client
}

// newCommand makes the flag set of a client command; define extra flags
// on cmd.fs, then call cmd.parse.
func newCommand(name string) *command {
	cmd := &command{fs: newFlagSet(name)}
	cmd.cf.register(cmd.fs)
	return cmd
}

// parse parses args and checks that there are between min and max
// positional arguments (what names them in the error).
func (cmd *command) parse(args []string, min, max int, what string) error {
	pos, err := cmd.cf.parse(cmd.fs, args)
	if err != nil {
		return err
	}
	if len(pos) < min || len(pos) > max {
		return fmt.Errorf("%w: %s: want %s", errUsage, cmd.fs.Name(), what)
	}
	cmd.pos = pos
	return nil
}

// do calls the API (making the client on first use, so that usage errors
// come before a missing config file).
func (cmd *command) do(method, path string, body, out any) error {
	if cmd.c == nil {
		c, err := cmd.cf.client()
		if err != nil {
			return err
		}
		cmd.c = c
	}
	return cmd.c.Do(method, path, body, out)
}

// set reports whether the flag name was given.
func (cmd *command) set(name string) bool {
	found := false
	cmd.fs.Visit(func(f *flag.Flag) { found = found || f.Name == name })
	return found
}

// out prints v as JSON with --json, else calls text.
func (cmd *command) out(w io.Writer, v any, text func() error) error {
	if cmd.cf.json {
		return printJSON(w, v)
	}
	return text()
}

func status(args []string, stdout io.Writer) error {
	cmd := newCommand("status")
	if err := cmd.parse(args, 0, 1, "at most one USER"); err != nil {
		return err
	}
	if len(cmd.pos) == 1 {
		var us director.UserStatus
		if err := cmd.do(http.MethodGet, admin.UserPath(cmd.pos[0]), nil, &us); err != nil {
			return err
		}
		return cmd.out(stdout, us, func() error { return printUserStatus(stdout, us) })
	}
	var st director.Status
	if err := cmd.do(http.MethodGet, "/v1/status", nil, &st); err != nil {
		return err
	}
	return cmd.out(stdout, st, func() error { return printStatus(stdout, st, time.Now()) })
}

func printUserStatus(w io.Writer, us director.UserStatus) error {
	exp := "-"
	if us.Expires != nil {
		exp = us.Expires.Local().Format(time.RFC3339)
	} else if us.Backend != "" {
		exp = "while sessions are open"
	}
	backend := us.Backend
	switch {
	case backend == "":
		backend = "(no record)"
	case us.Moving:
		backend += " (being moved)"
	}
	_, err := fmt.Fprintf(w, "user:          %s\nkey:           %s\ntag:           %s\nhash:          %d\nbackend:       %s\nsessions:      %d\nexpires:       %s\nhash backend:  %s\n",
		us.User, us.Key, dash(us.Tag), us.Hash, backend, us.Sessions, exp, dash(us.HashBackend))
	return err
}

// printStatus prints the backend table. Columns are separated by at least
// two spaces; HEALTH, CHECKED and LAST CHANGE may contain single spaces.
func printStatus(w io.Writer, st director.Status, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tWEIGHT\tTAG\tSTATE\tUSERS\tSESSIONS\tHEALTH\tCHECKED\tLAST CHANGE")
	for _, b := range st.Backends {
		state := "up"
		if !b.Up {
			state = "down"
		}
		health, checked := healthText(b.Health, now)
		change := "-"
		if b.Cause != nil {
			change = fmt.Sprintf("%s (%s)", oneLine(b.Cause.Text), ago(b.Cause.Time, now))
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", b.Address, b.Weight, dash(b.Tag), state, b.Users, b.Sessions, health, checked, change)
	}
	return tw.Flush()
}

// healthText returns the HEALTH and CHECKED cells: "-" when health checks
// are off.
func healthText(h *director.HealthInfo, now time.Time) (health, checked string) {
	if h == nil {
		return "-", "-"
	}
	checked = "-"
	if h.Checked != nil {
		checked = ago(*h.Checked, now)
	}
	switch {
	case h.HeldDown && h.HeldUntil != nil:
		health = "held down until " + h.HeldUntil.Local().Format(time.DateTime)
	case h.HeldDown:
		health = "held down"
	case h.Checked == nil:
		health = "pending"
	case h.LastError != "":
		health = "failing: " + oneLine(h.LastError)
	default:
		health = "ok"
	}
	return health, checked
}

// ago formats the age of t for humans ("3s ago").
func ago(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return max(now.Sub(t), 0).Round(time.Second).String() + " ago"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// oneLine keeps a server-provided text on one table line.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
}

func userMap(args []string, stdout io.Writer) error {
	cmd := newCommand("map")
	backend := cmd.fs.String("backend", "", "only the users of this backend")
	if err := cmd.parse(args, 0, 0, "no arguments (use --backend ADDR)"); err != nil {
		return err
	}
	path := "/v1/map"
	if *backend != "" {
		path += "?" + url.Values{"backend": {*backend}}.Encode()
	}
	var ma admin.MapAnswer
	if err := cmd.do(http.MethodGet, path, nil, &ma); err != nil {
		return err
	}
	return cmd.out(stdout, ma, func() error {
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "USER\tHASH\tBACKEND\tTAG\tSESSIONS\tEXPIRES")
		for _, u := range ma.Users {
			exp := "-"
			if u.Expires != nil {
				exp = u.Expires.Local().Format(time.RFC3339)
			}
			be := u.Backend
			if u.Moving {
				be += "(moving)"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%s\n", oneLine(u.User), u.Hash, be, dash(u.Tag), u.Sessions, exp)
		}
		return tw.Flush()
	})
}

const backendUsage = "backend add|update|remove|up|down ADDR"

func backend(args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: %s", errUsage, backendUsage)
	}
	if isHelp(args[0]) {
		return flag.ErrHelp
	}
	sub, args := args[0], args[1:]
	cmd := newCommand("backend " + sub)
	switch sub {
	case "add":
		weight := cmd.fs.Int("weight", 100, "weight 0..1000 (0 drains)")
		tag := cmd.fs.String("tag", "", "pool tag")
		if err := cmd.parse(args, 1, 1, "one ADDR"); err != nil {
			return err
		}
		req := admin.AddBackendRequest{Address: cmd.pos[0], Tag: *tag}
		if cmd.set("weight") {
			req.Weight = weight
		}
		var a admin.AddBackendAnswer
		if err := cmd.do(http.MethodPost, "/v1/backends", req, &a); err != nil {
			return err
		}
		return cmd.out(stdout, a, func() error {
			if a.Tag != "" {
				_, err := fmt.Fprintf(stdout, "backend %s added (weight %d, tag %s)\n", a.Address, a.Weight, a.Tag)
				return err
			}
			_, err := fmt.Fprintf(stdout, "backend %s added (weight %d)\n", a.Address, a.Weight)
			return err
		})
	case "update":
		weight := cmd.fs.Int("weight", 0, "weight 0..1000 (0 drains)")
		if err := cmd.parse(args, 1, 1, "one ADDR and --weight N"); err != nil {
			return err
		}
		if !cmd.set("weight") {
			return fmt.Errorf("%w: backend update: --weight N is required", errUsage)
		}
		var b director.BackendStatus
		if err := cmd.do(http.MethodPatch, admin.BackendPath(cmd.pos[0]), admin.UpdateBackendRequest{Weight: weight}, &b); err != nil {
			return err
		}
		return cmd.out(stdout, b, func() error {
			_, err := fmt.Fprintf(stdout, "backend %s: weight %d\n", b.Address, b.Weight)
			return err
		})
	case "remove":
		if err := cmd.parse(args, 1, 1, "one ADDR"); err != nil {
			return err
		}
		var a admin.RemoveAnswer
		if err := cmd.do(http.MethodDelete, admin.BackendPath(cmd.pos[0]), nil, &a); err != nil {
			return err
		}
		return cmd.out(stdout, a, func() error {
			_, err := fmt.Fprintf(stdout, "backend %s removed\n", a.Removed)
			return err
		})
	case "up", "down":
		var cause *string
		if sub == "down" {
			cause = cmd.fs.String("cause", admin.DefaultCause, "why (shown by usher status)")
		}
		if err := cmd.parse(args, 1, 1, "one ADDR"); err != nil {
			return err
		}
		var req any
		if cause != nil {
			req = admin.SetUpRequest{Cause: *cause}
		}
		var b director.BackendStatus
		if err := cmd.do(http.MethodPost, admin.BackendPath(cmd.pos[0])+"/"+sub, req, &b); err != nil {
			return err
		}
		return cmd.out(stdout, b, func() error {
			msg := fmt.Sprintf("backend %s is %s", b.Address, sub)
			if b.Cause != nil {
				msg += " (cause: " + oneLine(b.Cause.Text) + ")"
			}
			_, err := fmt.Fprintln(stdout, msg)
			return err
		})
	}
	return fmt.Errorf("%w: unknown backend command %q: %s", errUsage, sub, backendUsage)
}

const userUsage = "user move USER BACKEND | user kick USER"

func user(args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: %s", errUsage, userUsage)
	}
	if isHelp(args[0]) {
		return flag.ErrHelp
	}
	sub, args := args[0], args[1:]
	cmd := newCommand("user " + sub)
	switch sub {
	case "move":
		if err := cmd.parse(args, 2, 2, "USER BACKEND"); err != nil {
			return err
		}
		var us director.UserStatus
		if err := cmd.do(http.MethodPost, admin.UserPath(cmd.pos[0])+"/move", admin.MoveRequest{Backend: cmd.pos[1]}, &us); err != nil {
			return err
		}
		return cmd.out(stdout, us, func() error {
			_, err := fmt.Fprintf(stdout, "user %s moved to %s\n", us.Key, us.Backend)
			return err
		})
	case "kick":
		if err := cmd.parse(args, 1, 1, "one USER"); err != nil {
			return err
		}
		var ka admin.KickAnswer
		if err := cmd.do(http.MethodPost, admin.UserPath(cmd.pos[0])+"/kick", nil, &ka); err != nil {
			return err
		}
		return cmd.out(stdout, ka, func() error {
			_, err := fmt.Fprintf(stdout, "kicked %d session(s) of %s\n", ka.Kicked, cmd.pos[0])
			return err
		})
	}
	return fmt.Errorf("%w: unknown user command %q: %s", errUsage, sub, userUsage)
}

func flush(args []string, stdout io.Writer) error {
	cmd := newCommand("flush")
	parallel := cmd.fs.Int("max-parallel", 0, "moves at a time (default 10)")
	forget := cmd.fs.Bool("forget", false, "drop the records, kick nobody")
	if err := cmd.parse(args, 1, 1, "one BACKEND or \"all\""); err != nil {
		return err
	}
	req := admin.FlushRequest{Backend: cmd.pos[0], Forget: *forget}
	if cmd.set("max-parallel") {
		if *forget {
			return fmt.Errorf("%w: flush: --max-parallel has no meaning with --forget", errUsage)
		}
		req.MaxParallel = parallel
	}
	if *forget {
		var fa admin.ForgetAnswer
		if err := cmd.do(http.MethodPost, "/v1/flush", req, &fa); err != nil {
			return err
		}
		return cmd.out(stdout, fa, func() error {
			_, err := fmt.Fprintf(stdout, "forgot %d user record(s) of %s\n", fa.Forgotten, req.Backend)
			return err
		})
	}
	var res director.FlushResult
	if err := cmd.do(http.MethodPost, "/v1/flush", req, &res); err != nil {
		return err
	}
	err := cmd.out(stdout, res, func() error {
		_, err := fmt.Fprintf(stdout, "flush %s: %d user(s): %d moved, %d kept, %d failed\n", req.Backend, res.Users, res.Moved, res.Kept, res.Failed)
		return err
	})
	if err == nil && res.Failed > 0 {
		err = fmt.Errorf("flush %s: %d move(s) failed (see the usher log)", req.Backend, res.Failed)
	}
	return err
}

func dump(args []string, stdout io.Writer) error {
	cmd := newCommand("dump")
	if err := cmd.parse(args, 0, 0, "no arguments"); err != nil {
		return err
	}
	var da admin.DumpAnswer
	if err := cmd.do(http.MethodGet, "/v1/dump", nil, &da); err != nil {
		return err
	}
	if cmd.cf.json {
		return printJSON(stdout, da)
	}
	lines, err := dumpLines(da.Commands)
	if err != nil {
		return err
	}
	_, err = io.WriteString(stdout, strings.Join(lines, ""))
	return err
}

// dumpLines turns the dump into shell lines. A down backend is marked
// down right after it is added, so that a replay routes no new user to it
// for longer than that.
func dumpLines(cmds []state.Command) ([]string, error) {
	var lines []string
	for _, c := range cmds {
		if c.Type != state.CmdAddBackend {
			return nil, fmt.Errorf("dump: unexpected command %s", c.Type)
		}
		addr := shellQuote(c.Backend.String())
		l := fmt.Sprintf("usher backend add %s --weight %d", addr, c.Weight)
		if c.Tag != "" {
			l += " --tag " + shellQuote(c.Tag)
		}
		lines = append(lines, l+"\n")
		if !c.Up {
			lines = append(lines, "usher backend down "+addr+"\n")
		}
	}
	return lines, nil
}

// shellQuote quotes s for a POSIX shell unless it is made of safe bytes.
func shellQuote(s string) string {
	safe := s != ""
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("_.-:/%@+=,", r)) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("print json: %w", err)
	}
	return nil
}
