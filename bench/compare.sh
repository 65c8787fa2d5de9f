#!/usr/bin/env bash
# Side-by-side benchmark (issue 5): the same workloads against the Dovecot
# backends directly, through usher, and through a Dovecot 2.3 director in
# proxy mode, interleaved over several rounds (see test/cmd/compare and
# docs/BENCHMARKS.md).
#
# It installs the Debian packages (test/scripts/install-deps.sh), builds
# bin/usher and bin/usher-compare, runs the comparison, and writes
# bench/results/ (results.json, results.md, warnings.log, perf-*.txt, pprof-*.txt),
# docs/benchmark.png and the results section of docs/BENCHMARKS.md.
#
# Arguments go to test/cmd/compare, e.g. `bench/compare.sh --rounds 5
# --duration 20s` (see `bin/usher-compare -h`). PROFILE names the
# workloads to profile with perf afterwards (default imap-login; empty: none).
# Needs root; takes about 10 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
PROFILE=${PROFILE-imap-login}

test/scripts/install-deps.sh
mkdir -p bin bench/results docs
version=$(git describe --always --dirty 2>/dev/null || echo dev)
"$GO" build -ldflags "-X github.com/usher-mail/usher/internal/cli.Version=$version" -o bin/usher ./cmd/usher
"$GO" build -o bin/usher-compare ./test/cmd/compare

args=(--usher bin/usher --out bench/results --chart docs/benchmark.png --doc docs/BENCHMARKS.md)
if [ -n "$PROFILE" ]; then
  if command -v perf >/dev/null; then
    args+=(--profile "$PROFILE")
  else
    echo "compare.sh: perf not installed (Debian: linux-perf), not profiling" >&2
  fi
fi
exec bin/usher-compare "${args[@]}" "$@"
