package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/usher-mail/usher/internal/admin"
	"github.com/usher-mail/usher/internal/director"
)

func status(args []string, stdout io.Writer) error {
	fs := newFlagSet("status")
	var sf socketFlags
	sf.register(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return fmt.Errorf("%w: status takes at most one USER", errUsage)
	}
	path, err := sf.path()
	if err != nil {
		return err
	}
	c := admin.NewClient(path)
	if len(pos) == 1 {
		var us director.UserStatus
		if err := c.Do(http.MethodGet, admin.UserPath(pos[0]), nil, &us); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, us)
		}
		exp := "-"
		if us.Expires != nil {
			exp = us.Expires.Local().Format(time.RFC3339)
		} else if us.Backend != "" {
			exp = "while sessions are open"
		}
		backend := us.Backend
		if backend == "" {
			backend = "(no record)"
		}
		fmt.Fprintf(stdout, "user:          %s\nkey:           %s\nhash:          %d\nbackend:       %s\nsessions:      %d\nexpires:       %s\nhash backend:  %s\n",
			us.User, us.Key, us.Hash, backend, us.Sessions, exp, us.HashBackend)
		return nil
	}
	var st director.Status
	if err := c.Do(http.MethodGet, "/v1/status", nil, &st); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, st)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tWEIGHT\tTAG\tSTATE\tUSERS\tSESSIONS")
	for _, b := range st.Backends {
		state := "up"
		if !b.Up {
			state = "down"
		}
		tag := b.Tag
		if tag == "" {
			tag = "-"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%d\n", b.Address, b.Weight, tag, state, b.Users, b.Sessions)
	}
	return tw.Flush()
}

func backend(args []string, stdout io.Writer) error {
	if len(args) == 0 || args[0] != "add" {
		return fmt.Errorf("%w: backend add ADDR [--weight N] [--tag T]", errUsage)
	}
	fs := newFlagSet("backend add")
	var sf socketFlags
	sf.register(fs)
	weight := fs.Int("weight", 100, "weight (0 drains)")
	tag := fs.String("tag", "", "pool tag")
	pos, err := parseInterspersed(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: backend add takes one ADDR", errUsage)
	}
	path, err := sf.path()
	if err != nil {
		return err
	}
	req := admin.AddBackendRequest{Address: pos[0], Weight: weight, Tag: *tag}
	if err := admin.NewClient(path).Do(http.MethodPost, "/v1/backends", req, nil); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "backend %s added (weight %d)\n", pos[0], *weight)
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
