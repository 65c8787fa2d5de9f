package config_test

import (
	"math"
	"strings"
	"testing"

	"github.com/usher-mail/usher/internal/config"
)

func TestBalanceFactorParse(t *testing.T) {
	if c := mustParse(t, minimal); c.BalanceFactor != 0 {
		t.Errorf("default balance_factor = %v, want 0 (off)", c.BalanceFactor)
	}
	for doc, want := range map[string]float64{
		"balance_factor = 1.02\n": 1.02,
		"balance_factor = 1\n":    1, // a TOML integer is a number too
		"balance_factor = 0\n":    0,
		"balance_factor = 10.0\n": 10,
	} {
		c := mustParse(t, doc+minimal)
		if c.BalanceFactor != want {
			t.Errorf("%q: balance_factor = %v, want %v", doc, c.BalanceFactor, want)
		}
		if err := c.ValidateNoFiles(); err != nil {
			t.Errorf("%q: Validate: %v", doc, err)
		}
	}
	for doc, want := range map[string]string{
		"balance_factor = \"1.02\"\n": `usher.toml:1: balance_factor: want a number, got a string`,
		"balance_factor = true\n":     `usher.toml:1: balance_factor: want a number, got a boolean`,
		"Balance_Factor = 1.02\n":     `Balance_Factor`,
	} {
		if got := parseErr(t, doc+minimal); !strings.Contains(got, want) {
			t.Errorf("%q: error %q, want it to contain %q", doc, got, want)
		}
	}
}

func TestBalanceFactorValidate(t *testing.T) {
	for _, c := range []struct {
		factor  float64
		routing string
		want    string // "" = valid
	}{
		{0, "dovecot", ""},
		{1, "rendezvous", ""},
		{1.02, "rendezvous", ""},
		{config.MaxBalanceFactor, "rendezvous", ""},
		{0.99, "rendezvous", "balance_factor: must be 0 (off) or between 1 and 10, got 0.99"},
		{-1, "rendezvous", "balance_factor: must be 0 (off) or between 1 and 10, got -1"},
		{10.5, "rendezvous", "balance_factor: must be 0 (off) or between 1 and 10, got 10.5"},
		{math.NaN(), "rendezvous", "balance_factor: must be 0 (off) or between 1 and 10, got NaN"},
		{math.Inf(1), "rendezvous", "balance_factor: must be 0 (off) or between 1 and 10, got +Inf"},
		{1.02, "dovecot", `balance_factor: must be 0 with routing = "dovecot"`},
	} {
		cfg := mustParse(t, minimal)
		cfg.BalanceFactor, cfg.Routing = c.factor, c.routing
		err := cfg.ValidateNoFiles()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("factor %v routing %s: %v", c.factor, c.routing, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("factor %v routing %s: error %v, want %q", c.factor, c.routing, err, c.want)
		case c.want != "" && numErrs(err) != 1:
			t.Errorf("factor %v routing %s: %d errors, want 1: %v", c.factor, c.routing, numErrs(err), err)
		}
	}
}
