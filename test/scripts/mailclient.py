#!/usr/bin/env python3
"""Real-client checks for usher's end-to-end tests (stdlib imaplib/poplib only).

Every subcommand prints one JSON object on stdout and exits 0 on success,
1 when the server refused something (the JSON then has "ok": false and the
server's answer in "error"), 2 on usage errors.

Every subcommand takes --source IP to connect from that local address.

  mailclient.py imap-roundtrip HOST PORT USER PASS SUBJECT [--starttls --cafile F]
      LOGIN, LIST, SELECT INBOX, APPEND a message with SUBJECT, SEARCH it,
      FETCH it back and compare byte for byte.
  mailclient.py imap-login HOST PORT USER PASS [--starttls --cafile F]
      LOGIN and LOGOUT only.
  mailclient.py pop3 HOST PORT USER PASS [--stls --cafile F] [--retr N]
      USER/PASS, STAT, optionally RETR N.
"""
import argparse
import imaplib
import json
import poplib
import socket
import ssl
import sys

TIMEOUT = 15


def context(cafile):
    # Verifies the chain against the harness CA and the IP address SAN.
    return ssl.create_default_context(cafile=cafile)


def out(obj, code=0):
    print(json.dumps(obj))
    sys.exit(code)


def text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


class SourceIMAP4(imaplib.IMAP4):
    """IMAP4 that connects from a chosen local address (--source)."""
    source = None

    def _create_socket(self, timeout):
        src = (self.source, 0) if self.source else None
        return socket.create_connection((self.host, self.port), timeout, source_address=src)


class SourcePOP3(poplib.POP3):
    """POP3 that connects from a chosen local address (--source)."""
    source = None

    def _create_socket(self, timeout):
        src = (self.source, 0) if self.source else None
        return socket.create_connection((self.host, self.port), timeout, source_address=src)


def imap_connect(a):
    SourceIMAP4.source = a.source
    m = SourceIMAP4(a.host, a.port, timeout=TIMEOUT)
    res = {"greeting": text(m.welcome), "capabilities": list(m.capabilities)}
    if a.starttls:
        m.starttls(ssl_context=context(a.cafile))
        res["tls"] = True
    return m, res


def imap_login(a):
    m, res = imap_connect(a)
    try:
        typ, data = m.login(a.user, a.password)
    except imaplib.IMAP4.error as e:
        res.update(ok=False, error=str(e))
        out(res, 1)
    res.update(login=typ, login_text=text(data[0]))
    m.logout()
    res["ok"] = True
    out(res)


def imap_roundtrip(a):
    m, res = imap_connect(a)
    try:
        m.login(a.user, a.password)
    except imaplib.IMAP4.error as e:
        res.update(ok=False, error=str(e))
        out(res, 1)
    typ, boxes = m.list()
    res["list"] = [text(b) for b in boxes if b is not None]
    typ, data = m.select("INBOX")
    if typ != "OK":
        res.update(ok=False, error="SELECT: " + text(data[0]))
        out(res, 1)
    msg = ("From: e2e@example.com\r\nTo: %s\r\nSubject: %s\r\n"
           "Message-ID: <%s@py.e2e.example>\r\n\r\nHello from imaplib.\r\n"
           % (a.user, a.subject, a.subject.replace(" ", "-"))).encode()
    typ, data = m.append("INBOX", None, None, msg)
    res["append"] = [typ, text(data[0])]
    if typ != "OK":
        res.update(ok=False, error="APPEND: " + text(data[0]))
        out(res, 1)
    typ, data = m.uid("SEARCH", None, "HEADER", "Subject", '"%s"' % a.subject)
    uids = data[0].split()
    res["uids"] = [text(u) for u in uids]
    if len(uids) != 1:
        res.update(ok=False, error="SEARCH found %d messages" % len(uids))
        out(res, 1)
    typ, data = m.uid("FETCH", uids[0], "(BODY.PEEK[])")
    body = data[0][1] if data and isinstance(data[0], tuple) else b""
    res["fetched_equal"] = body == msg
    m.close()
    m.logout()
    res["ok"] = res["fetched_equal"]
    if not res["ok"]:
        res["error"] = "fetched message differs: %r" % body[:200]
    out(res, 0 if res["ok"] else 1)


def pop3(a):
    SourcePOP3.source = a.source
    p = SourcePOP3(a.host, a.port, timeout=TIMEOUT)
    res = {"greeting": text(p.getwelcome())}
    try:
        if a.stls:
            p.stls(context=context(a.cafile))
            res["tls"] = True
        p.user(a.user)
        p.pass_(a.password)
    except poplib.error_proto as e:
        res.update(ok=False, error=text(e.args[0]) if e.args else str(e))
        out(res, 1)
    count, size = p.stat()
    res.update(count=count, size=size)
    if a.retr:
        resp, lines, octets = p.retr(a.retr)
        res["retr"] = [text(l) for l in lines]
    p.quit()
    res["ok"] = True
    out(res)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("imap-roundtrip", "imap-login", "pop3"):
        s = sub.add_parser(name)
        s.add_argument("host")
        s.add_argument("port", type=int)
        s.add_argument("user")
        s.add_argument("password")
        if name == "imap-roundtrip":
            s.add_argument("subject")
        if name == "pop3":
            s.add_argument("--stls", action="store_true")
            s.add_argument("--retr", type=int, default=0)
        else:
            s.add_argument("--starttls", action="store_true")
        s.add_argument("--cafile")
        s.add_argument("--source", help="local IP address to connect from")
    a = ap.parse_args()
    try:
        {"imap-roundtrip": imap_roundtrip, "imap-login": imap_login, "pop3": pop3}[a.cmd](a)
    except (OSError, imaplib.IMAP4.error, poplib.error_proto) as e:
        out({"ok": False, "error": "%s: %s" % (type(e).__name__, e)}, 1)


if __name__ == "__main__":
    main()
