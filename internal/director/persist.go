package director

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/usher-mail/usher/internal/state"
)

// load reads the state file, if there is one, and applies CmdRestart: no
// session survived the restart. It reports whether a state was loaded.
func (d *Director) load(expire time.Duration) (bool, error) {
	if d.stateFile == "" {
		return false, nil
	}
	data, err := os.ReadFile(d.stateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("load state: %w", err)
	}
	st := state.New(expire)
	if err := json.Unmarshal(data, st); err != nil {
		return false, fmt.Errorf("load state %s: %w", d.stateFile, err)
	}
	if _, err := st.Apply(state.Command{Type: state.CmdRestart, Time: d.now()}); err != nil {
		return false, fmt.Errorf("load state: %w", err)
	}
	if expire > 0 && st.Expire() != expire {
		if _, err := st.Apply(state.Command{Type: state.CmdSetExpire, Expire: expire}); err != nil {
			return false, fmt.Errorf("load state: %w", err)
		}
	}
	d.st = st
	d.log.Info("state loaded", "file", d.stateFile, "backends", len(st.Backends()), "users", len(st.Users()))
	return true, nil
}

// Save writes the state file atomically (temporary file, fsync, rename,
// fsync of the directory). Without a state file it does nothing.
func (d *Director) Save() error {
	if d.stateFile == "" {
		return nil
	}
	d.saveMu.Lock()
	defer d.saveMu.Unlock()
	d.mu.Lock()
	data, err := json.MarshalIndent(d.st, "", " ")
	d.dirty = false
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	return writeFileAtomic(d.stateFile, append(data, '\n'), 0o600)
}

func (d *Director) saveIfDirty() error {
	d.mu.Lock()
	dirty := d.dirty
	d.mu.Unlock()
	if !dirty {
		return nil
	}
	return d.Save()
}

func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if df, err := os.Open(dir); err == nil {
		_ = df.Sync()
		df.Close()
	}
	return nil
}
