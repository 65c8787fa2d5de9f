package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// clockTicks is USER_HZ, the unit of utime/stime in /proc/PID/stat; Linux
// fixes it at 100 on every architecture Go supports for this program.
const clockTicks = 100

// procInfo is what one /proc/PID/stat line says about a process.
type procInfo struct {
	pid, ppid int
	// ticks is utime+stime+cutime+cstime: the CPU the process used plus the
	// CPU of its children that it has waited for, in clock ticks. Summed
	// over a process tree it counts every process that lived in the tree
	// and was reaped inside it (proc(5)).
	ticks int64
	// rssPages is the resident set size in pages.
	rssPages int64
}

// parseStat parses one /proc/PID/stat line (proc(5)). The command name
// (field 2) is in parentheses and may hold spaces and parentheses itself,
// so the fields are counted from the last ')'.
func parseStat(line []byte) (procInfo, error) {
	var p procInfo
	open := bytes.IndexByte(line, '(')
	end := bytes.LastIndexByte(line, ')')
	if open < 1 || end < open {
		return p, fmt.Errorf("parse /proc stat: no (comm) in %q", truncate(line, 80))
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(line[:open])))
	if err != nil {
		return p, fmt.Errorf("parse /proc stat: pid: %w", err)
	}
	f := bytes.Fields(line[end+1:])
	// f[0] is field 3 (state): field n is f[n-3].
	if len(f) < 22 {
		return p, fmt.Errorf("parse /proc stat of %d: %d fields after comm, want at least 22", pid, len(f))
	}
	num := func(field int) (int64, error) {
		v, err := strconv.ParseInt(string(f[field-3]), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc stat of %d: field %d: %w", pid, field, err)
		}
		return v, nil
	}
	p.pid = pid
	ppid, err := num(4)
	if err != nil {
		return p, err
	}
	p.ppid = int(ppid)
	for _, field := range []int{14, 15, 16, 17} { // utime stime cutime cstime
		v, err := num(field)
		if err != nil {
			return p, err
		}
		p.ticks += v
	}
	if p.rssPages, err = num(24); err != nil {
		return p, err
	}
	return p, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// procSnapshot is every process's stat at one moment.
type procSnapshot map[int]procInfo

// readProcs reads /proc/[0-9]*/stat. Processes that exit while it reads
// are skipped.
func readProcs(root string) (procSnapshot, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("read processes: %w", err)
	}
	snap := make(procSnapshot, len(ents))
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join(root, e.Name(), "stat"))
		if err != nil {
			continue // gone
		}
		p, err := parseStat(data)
		if err != nil {
			return nil, err
		}
		snap[p.pid] = p
	}
	return snap, nil
}

// tree returns the pids of the processes rooted at roots (the roots
// themselves and all their descendants), each once.
func (s procSnapshot) tree(roots ...int) []int {
	children := make(map[int][]int, len(s))
	for _, p := range s {
		children[p.ppid] = append(children[p.ppid], p.pid)
	}
	seen := make(map[int]bool)
	var out []int
	queue := append([]int(nil), roots...)
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		if seen[pid] {
			continue
		}
		seen[pid] = true
		if _, ok := s[pid]; !ok {
			continue
		}
		out = append(out, pid)
		queue = append(queue, children[pid]...)
	}
	return out
}

// usage is the CPU time (ticks) and resident memory (pages) of a process tree.
type usage struct {
	ticks, rssPages int64
	procs           int
}

// treeUsage sums the usage of the trees rooted at roots.
func (s procSnapshot) treeUsage(roots ...int) usage {
	var u usage
	for _, pid := range s.tree(roots...) {
		p := s[pid]
		u.ticks += p.ticks
		u.rssPages += p.rssPages
		u.procs++
	}
	return u
}

// cpuMillis converts clock ticks to milliseconds.
func cpuMillis(ticks int64) float64 { return float64(ticks) * 1000 / clockTicks }

// rssKiB converts pages to KiB.
// The unit of the rss field of /proc/PID/stat is the page size.
func rssKiB(pages int64) float64 { return float64(pages*int64(os.Getpagesize())) / 1024 }
