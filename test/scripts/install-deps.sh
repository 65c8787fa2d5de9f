#!/usr/bin/env bash
# Installs the Debian packages usher's tests and demo need: real Dovecot
# backends (IMAP, POP3, LMTP, ManageSieve, Sieve) and real clients. The
# system Dovecot service is kept from starting (and stopped if it runs), so
# that the test backends can bind their loopback addresses.
set -euo pipefail
pkgs=(dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-managesieved dovecot-sieve
      swaks sieve-connect curl openssl python3 ca-certificates iproute2 procps)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; fi
  created_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d
fi
# A system Dovecot listening on *:143 would take the backends' ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet dovecot 2>/dev/null; then
  systemctl stop dovecot || true
fi
if [ -r /run/dovecot/master.pid ] && kill -0 "$(cat /run/dovecot/master.pid)" 2>/dev/null; then
  doveadm stop 2>/dev/null || kill "$(cat /run/dovecot/master.pid)" || true
fi
echo "install-deps: ok"
