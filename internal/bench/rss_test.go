package bench

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestRSSOwnProcess(t *testing.T) {
	self := os.Getpid()
	kib, pids, err := RSSOptions{PIDs: []int{self}}.Measure()
	if err != nil {
		t.Fatal(err)
	}
	if kib < 1024 || !slices.Equal(pids, []int{self}) { // a Go test binary has well over 1 MiB resident
		t.Errorf("own RSS %d KiB, pids %v", kib, pids)
	}
	comm, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	name := strings.TrimSpace(string(comm))
	for _, pattern := range []string{name, name[:1] + "*"} {
		_, pids, err := RSSOptions{Comms: []string{pattern}}.Measure()
		if err != nil || !slices.Contains(pids, self) {
			t.Errorf("comm %q: pids %v err %v (self %d)", pattern, pids, err, self)
		}
	}
	// We are a descendant of our parent.
	_, pids, err = RSSOptions{PIDs: []int{os.Getppid()}, Children: true}.Measure()
	if err != nil || !slices.Contains(pids, self) || !slices.Contains(pids, os.Getppid()) {
		t.Errorf("children of %d: %v, %v", os.Getppid(), pids, err)
	}
	if _, _, err := (RSSOptions{PIDs: []int{1 << 30}}).Measure(); err == nil {
		t.Error("a missing --pid gave no error")
	}
}

// TestRSSFakeProc checks the parsing against a made-up /proc: comm with
// spaces and parens, kernel threads without VmRSS, a descendant tree.
func TestRSSFakeProc(t *testing.T) {
	dir := t.TempDir()
	proc := func(pid, stat, status string) {
		p := filepath.Join(dir, pid)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(p, "stat"), []byte(stat), 0o644)
		os.WriteFile(filepath.Join(p, "status"), []byte(status), 0o644)
	}
	proc("10", "10 (dovecot) S 1 10 10 0", "Name:\tdovecot\nVmRSS:\t    1000 kB\n")
	proc("11", "11 (imap-login) S 10 10 10 0", "Name:\timap-login\nVmRSS:\t 200 kB\n")
	proc("12", "12 (odd) name)) S 11 10 10 0", "Name:\todd\nVmRSS:\t 30 kB\n")
	proc("13", "13 (kthread) S 2 0 0 0", "Name:\tkthread\n")
	proc("14", "14 (imap) S 1 14 14 0", "Name:\timap\nVmRSS:\t 4 kB\n")
	os.MkdirAll(filepath.Join(dir, "self"), 0o755)

	o := RSSOptions{ProcDir: dir, PIDs: []int{10}, Children: true}
	kib, pids, err := o.Measure()
	if err != nil || kib != 1230 || !slices.Equal(pids, []int{10, 11, 12}) {
		t.Errorf("tree: %d KiB %v %v", kib, pids, err)
	}
	o = RSSOptions{ProcDir: dir, Comms: []string{"imap*", "kthread"}}
	kib, pids, err = o.Measure()
	if err != nil || kib != 204 || !slices.Equal(pids, []int{11, 13, 14}) {
		t.Errorf("comm: %d KiB %v %v", kib, pids, err)
	}
	o = RSSOptions{ProcDir: dir, Comms: []string{"odd) name)"}}
	if _, pids, _ = o.Measure(); !slices.Equal(pids, []int{12}) {
		t.Errorf("comm with parens: %v", pids)
	}
	proc("15", "15 (bad) S 1", "VmRSS: lots\n")
	if _, _, err := (RSSOptions{ProcDir: dir, PIDs: []int{15}}).Measure(); err == nil {
		t.Error("odd VmRSS line: no error")
	}
}
