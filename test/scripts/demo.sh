#!/usr/bin/env bash
# demo.sh start|stop|status — run usher in front of 3 real Dovecot backends.
#
#   start   (root) install Dovecot if missing (Debian/Ubuntu, without letting
#           the system service start; test/scripts/install-deps.sh), stop a
#           running system Dovecot, build usher and the demo supervisor
#           (test/cmd/demo), start everything in the background and print
#           how to connect.
#   stop    stop everything `start` started.
#   status  say whether the demo runs and print its instructions again.
#
# Environment: DEMO_DIR (default /tmp/usher-demo; it must be traversable by
# the mail user, so not under /root), DEMO_IMAP (127.0.0.1:10143),
# DEMO_POP3 (127.0.0.1:10110), DEMO_LMTP (127.0.0.1:10024; LMTP also
# listens on the UNIX socket $DEMO_DIR/run/lmtp.sock), DEMO_SIEVE
# (ManageSieve, 127.0.0.1:14190), DEMO_BACKENDS (3), DEMO_USERS (50).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEMO_DIR=${DEMO_DIR:-/tmp/usher-demo}
RUN="$DEMO_DIR/run"
PIDFILE="$DEMO_DIR/demo.pid"

die() { echo "demo: $*" >&2; exit 1; }

# running: the supervisor in PIDFILE is alive (a zombie or a reused pid has
# another, or an empty, command line).
running() {
	[[ -f $PIDFILE ]] && grep -qsF "$DEMO_DIR/demo" "/proc/$(cat "$PIDFILE")/cmdline"
}

find_go() {
	if command -v go >/dev/null 2>&1; then command -v go
	elif [[ -x /usr/local/go/bin/go ]]; then echo /usr/local/go/bin/go
	else die "the Go toolchain is needed (go not in PATH nor /usr/local/go/bin)"; fi
}

have_dovecot() {
	command -v dovecot >/dev/null 2>&1 || [[ -x /usr/sbin/dovecot ]]
}

# deps: install Dovecot and the clients if missing (Debian/Ubuntu, without
# letting the system service start) and stop a running system Dovecot, which
# would take the backends' ports. install-deps.sh does both.
deps() {
	if command -v apt-get >/dev/null 2>&1; then
		"$ROOT/test/scripts/install-deps.sh" || die "installing the dependencies failed"
	elif ! have_dovecot; then
		die "Dovecot is missing and this is not a Debian-like system; install Dovecot 2.3 (imapd, pop3d, lmtpd, managesieved, sieve)"
	fi
}

start() {
	[[ $(id -u) -eq 0 ]] || die "start needs root (Dovecot binds ports < 1024 and switches to the mail user)"
	if running; then
		echo "demo: already running (pid $(cat "$PIDFILE"))"
		cat "$RUN/ready" 2>/dev/null || true
		return 0
	fi
	deps
	local go; go=$(find_go)

	mkdir -p "$DEMO_DIR"
	chmod 755 "$DEMO_DIR"
	rm -rf "$RUN"
	echo "demo: building usher and the demo supervisor"
	(cd "$ROOT" && "$go" build -o "$DEMO_DIR/usher" ./cmd/usher && "$go" build -o "$DEMO_DIR/demo" ./test/cmd/demo) ||
		die "build failed"

	setsid "$DEMO_DIR/demo" -dir "$RUN" -usher "$DEMO_DIR/usher" \
		-imap "${DEMO_IMAP:-127.0.0.1:10143}" -pop3 "${DEMO_POP3:-127.0.0.1:10110}" \
		-lmtp "${DEMO_LMTP:-127.0.0.1:10024}" -lmtp-socket "$RUN/lmtp.sock" \
		-sieve "${DEMO_SIEVE:-127.0.0.1:14190}" \
		-backends "${DEMO_BACKENDS:-3}" -users "${DEMO_USERS:-50}" \
		</dev/null >"$DEMO_DIR/demo.log" 2>&1 &
	echo $! >"$PIDFILE"

	local pid=$!
	for _ in $(seq 300); do
		[[ -f $RUN/ready ]] && break
		# Not `running`: right after the fork the child's cmdline is still
		# the shell's. A zombie counts as exited.
		if [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) =~ ^(Z|X|)$ ]]; then
			cat "$DEMO_DIR/demo.log" >&2
			rm -f "$PIDFILE"
			die "the demo supervisor exited during start-up (log above, $DEMO_DIR/demo.log)"
		fi
		sleep 0.1
	done
	[[ -f $RUN/ready ]] || { stop; die "not ready after 30s; see $DEMO_DIR/demo.log"; }
	echo
	cat "$RUN/ready"
	echo "  demo     $DEMO_DIR/demo.log (supervisor pid $(cat "$PIDFILE"))"
}

# kill_pidfile FILE NAME: SIGKILL the process group in FILE if it is still
# the NAME program (pids can be reused).
kill_pidfile() {
	local f=$1 name=$2 pid
	[[ -f $f ]] || return 0
	pid=$(cat "$f")
	if [[ -n $pid ]] && grep -qs "$name" "/proc/$pid/cmdline"; then
		echo "demo: killing leftover $name (pid $pid)"
		kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

stop() {
	if running; then
		local pid; pid=$(cat "$PIDFILE")
		echo "demo: stopping (pid $pid)"
		kill -TERM "$pid"
		for _ in $(seq 150); do running || break; sleep 0.1; done
		if running; then kill -KILL "$pid" 2>/dev/null || true; fi
	else
		echo "demo: not running"
	fi
	rm -f "$PIDFILE"
	# Fallback for a supervisor that died without cleaning up.
	kill_pidfile "$RUN/usher.pid" usher
	for f in "$RUN"/dovecot-b*.pid; do
		[[ -e $f ]] && kill_pidfile "$f" dovecot
	done
	rm -f "$RUN/ready"
	return 0
}

status() {
	if running; then
		echo "demo: running (pid $(cat "$PIDFILE"))"
		cat "$RUN/ready" 2>/dev/null || true
	else
		echo "demo: not running"
		return 1
	fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
