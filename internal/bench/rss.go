package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// RSSOptions name the processes whose resident memory the idle workload
// reads from /proc before and after it opens its sessions.
type RSSOptions struct {
	PIDs     []int    // these processes (they must exist)
	Comms    []string // every process whose comm (/proc/PID/comm) equals one, or matches it as a path.Match glob
	Children bool     // also every descendant of PIDs (re-scanned at each reading: new children count)
	ProcDir  string   // default /proc
}

// Enabled reports whether any process is named.
func (o RSSOptions) Enabled() bool { return len(o.PIDs) > 0 || len(o.Comms) > 0 }

func (o RSSOptions) proc() string {
	if o.ProcDir == "" {
		return "/proc"
	}
	return o.ProcDir
}

// Measure returns the summed VmRSS (KiB) of the named processes and their pids.
// Processes found by name or as children that exit meanwhile are skipped.
func (o RSSOptions) Measure() (kib int64, pids []int, err error) {
	pids, err = o.processes()
	if err != nil {
		return 0, nil, err
	}
	explicit := map[int]bool{}
	for _, p := range o.PIDs {
		explicit[p] = true
	}
	var found []int
	for _, p := range pids {
		v, err := readVmRSS(filepath.Join(o.proc(), strconv.Itoa(p), "status"))
		if err != nil {
			if explicit[p] {
				return 0, nil, fmt.Errorf("read RSS of pid %d: %w", p, err)
			}
			continue
		}
		kib += v
		found = append(found, p)
	}
	return kib, found, nil
}

// processes lists the pids named by o, sorted and without duplicates.
func (o RSSOptions) processes() ([]int, error) {
	pids := slices.Clone(o.PIDs)
	if len(o.Comms) > 0 || o.Children {
		all, err := o.scan()
		if err != nil {
			return nil, err
		}
		for _, p := range all {
			if len(o.Comms) > 0 && o.commMatches(p.comm) {
				pids = append(pids, p.pid)
			}
		}
		if o.Children {
			kids := map[int][]int{}
			for _, p := range all {
				kids[p.ppid] = append(kids[p.ppid], p.pid)
			}
			queue := slices.Clone(o.PIDs)
			for len(queue) > 0 {
				p := queue[0]
				queue = queue[1:]
				for _, k := range kids[p] {
					pids = append(pids, k)
					queue = append(queue, k)
				}
			}
		}
	}
	slices.Sort(pids)
	return slices.Compact(pids), nil
}

func (o RSSOptions) commMatches(comm string) bool {
	for _, c := range o.Comms {
		if c == comm {
			return true
		}
		if ok, err := path.Match(c, comm); err == nil && ok {
			return true
		}
	}
	return false
}

type procInfo struct {
	pid, ppid int
	comm      string
}

// scan reads pid, ppid and comm of every process from /proc/PID/stat
// (proc(5): "pid (comm) state ppid ..."; comm may hold spaces and parens,
// so it ends at the last ')').
func (o RSSOptions) scan() ([]procInfo, error) {
	ents, err := os.ReadDir(o.proc())
	if err != nil {
		return nil, fmt.Errorf("scan processes: %w", err)
	}
	var out []procInfo
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		b, err := os.ReadFile(filepath.Join(o.proc(), e.Name(), "stat"))
		if err != nil {
			continue // exited meanwhile
		}
		open, closing := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
		if open < 0 || closing < open {
			continue
		}
		f := strings.Fields(string(b[closing+1:]))
		if len(f) < 2 {
			continue
		}
		ppid, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		out = append(out, procInfo{pid: pid, ppid: ppid, comm: string(b[open+1 : closing])})
	}
	return out, nil
}

// readVmRSS returns the VmRSS line of a /proc/PID/status file in KiB
// (proc(5)); a process without one (a kernel thread, a zombie) has 0.
func readVmRSS(file string) (int64, error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("%s: odd VmRSS line %q", file, sc.Text())
		}
		return strconv.ParseInt(fields[0], 10, 64)
	}
	return 0, sc.Err()
}
