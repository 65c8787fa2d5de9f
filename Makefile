# usher — see README.md. All targets run from a fresh Debian machine as root.
GO      ?= go
BIN     := bin/usher
VERSION := $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: all build test unit fuzz-seeds e2e fuzz bench demo demo-stop deps clean

all: build

build:
	$(GO) build -ldflags "-X github.com/usher-mail/usher/internal/cli.Version=$(VERSION)" -o $(BIN) ./cmd/usher

# Debian packages the end-to-end tests and the demo need (real Dovecot backends,
# real clients). Installing never starts the system Dovecot service.
deps:
	test/scripts/install-deps.sh

# Unit tests (with -race; they also run every fuzz seed corpus), then the
# end-to-end tests against real Dovecot backends.
test: unit e2e

unit:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 5m ./internal/... ./cmd/...

e2e:
	$(GO) test -count=1 -timeout 8m ./test/...

# Run every fuzzer for FUZZTIME each (not part of `make test`).
FUZZTIME ?= 30s
fuzz:
	@for pkg in ./internal/imap ./internal/pop3 ./internal/lmtp ./internal/sieve ./internal/wire ./internal/sasl ./internal/route ./internal/config; do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

# Go microbenchmarks, then the side-by-side comparison of direct, usher and
# the Dovecot 2.3 director (bench/compare.sh, about 10 minutes, root; it
# rewrites docs/BENCHMARKS.md's results and docs/benchmark.png). BENCH_ARGS
# go to test/cmd/compare, e.g. BENCH_ARGS="--rounds 5 --duration 20s".
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./internal/...
	GO=$(GO) bench/compare.sh $(BENCH_ARGS)

demo:
	test/scripts/demo.sh start

demo-stop:
	test/scripts/demo.sh stop

clean:
	rm -rf bin
