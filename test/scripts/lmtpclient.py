#!/usr/bin/env python3
"""LMTP client for usher's end-to-end tests (stdlib smtplib.LMTP only).

Prints one JSON object on stdout. Exit status: 0 when every recipient got a
2xx reply after the message, 1 when any recipient was refused (at RCPT or
after DATA) or the server broke the conversation, 2 on usage errors.

  lmtpclient.py send HOST PORT --from ADDR --to A,B,C --subject S --msgid ID
                [--source IP]
      HOST is an IP address, or the absolute path of a UNIX socket (PORT is
      then ignored; smtplib.LMTP connects to a path starting with '/').
      LHLO, MAIL FROM, RCPT TO each recipient, DATA with a small message and
      then, as RFC 2033 section 4.2 demands, one reply per accepted
      recipient. smtplib's sendmail() reads only the first of those, so this
      drives the transaction with mail()/rcpt()/data() and reads the
      further replies with getreply().

JSON: {"ok": bool, "greeting": [code, text], "rcpt": {addr: [code, text]},
       "data": {addr: [code, text]}, "error": str (on failure)}
"""
import argparse
import json
import smtplib
import sys

TIMEOUT = 15


def text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def out(obj, code):
    print(json.dumps(obj))
    sys.exit(code)


def message(a, rcpts):
    return (
        "From: <%s>\r\nTo: %s\r\nSubject: %s\r\nMessage-ID: <%s>\r\n\r\n"
        "Body of %s.\r\n.leading dot line\r\n" % (a.sender, ", ".join(rcpts), a.subject, a.msgid, a.subject)
    ).encode()


def send(a):
    rcpts = [r for r in a.to.split(",") if r]
    res = {"ok": False, "rcpt": {}, "data": {}}
    src = (a.source, 0) if a.source else None
    try:
        m = smtplib.LMTP(timeout=TIMEOUT, source_address=src)
        code, msg = m.connect(a.host, a.port)
        res["greeting"] = [code, text(msg)]
        code, msg = m.ehlo()  # LMTP.ehlo_msg is "lhlo"
        if code != 250:
            res["error"] = "LHLO: %d %s" % (code, text(msg))
            out(res, 1)
        code, msg = m.mail(a.sender)
        if code != 250:
            res["error"] = "MAIL: %d %s" % (code, text(msg))
            out(res, 1)
        accepted = []
        for r in rcpts:
            code, msg = m.rcpt(r)
            res["rcpt"][r] = [code, text(msg)]
            if 200 <= code < 300:
                accepted.append(r)
        if not accepted:
            m.rset()
            m.quit()
            out(res, 1)
        # data() sends DATA and the message and returns the first reply.
        code, msg = m.data(message(a, rcpts))
        res["data"][accepted[0]] = [code, text(msg)]
        for r in accepted[1:]:
            code, msg = m.getreply()
            res["data"][r] = [code, text(msg)]
        m.quit()
    except (smtplib.SMTPException, OSError) as e:
        res["error"] = "%s: %s" % (type(e).__name__, e)
        out(res, 1)
    res["ok"] = len(res["data"]) == len(rcpts) and all(200 <= c < 300 for c, _ in res["data"].values())
    out(res, 0 if res["ok"] else 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--from", dest="sender", required=True)
    s.add_argument("--to", required=True, help="comma-separated recipients")
    s.add_argument("--subject", required=True)
    s.add_argument("--msgid", required=True)
    s.add_argument("--source", help="local IP address to connect from")
    a = p.parse_args()
    if a.cmd == "send":
        send(a)


if __name__ == "__main__":
    main()
