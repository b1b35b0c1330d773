"""A real SMTP server for keywatch's delivery tests (aiosmtpd, on loopback).

usage: smtp_sink.py PORT DIR [--tls CERT KEY] [--implicit-tls] [--auth USER PASSWORD]
                    [--reply-delay SECONDS]

--tls offers STARTTLS with the certificate and requires it before MAIL; with --implicit-tls the
connection is TLS from the first byte instead. --auth requires AUTH (PLAIN or LOGIN) with that
user and password. --reply-delay writes each message, then waits that long before answering
250, which opens the window between "the server has it" and "the client knows" that a crash
test needs.

Every message accepted is written to DIR as N.eml (the raw message) and N.json (envelope
recipients, headers, and the decoded plain-text and HTML parts), each renamed into place
once complete. Prints "ready" when it listens.
"""
import argparse
import asyncio
import email
import email.policy
import json
import os
import ssl
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Sink:
    def __init__(self, out, reply_delay):
        self.out = out
        self.reply_delay = reply_delay

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        parts = {}
        for part in msg.walk():
            if part.get_content_maintype() == "text":
                parts[part.get_content_subtype()] = part.get_content()
        name = str(time.time_ns())
        doc = {
            "mail_from": envelope.mail_from,
            "tls": session.ssl is not None,
            "auth": session.authenticated,
            "rcpt_to": envelope.rcpt_tos,
            "headers": [[k, str(v)] for k, v in msg.items()],
            "subject": str(msg["Subject"]),
            "message_id": str(msg["Message-ID"]),
            "content_type": msg.get_content_type(),
            "text": parts.get("plain"),
            "html": parts.get("html"),
        }
        for ext, data in ((".eml", raw), (".json", json.dumps(doc).encode())):
            tmp = os.path.join(self.out, name + ext + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, os.path.join(self.out, name + ext))
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        return "250 OK queued"


def authenticator(user, password):
    def check(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=ok)

    return check


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--implicit-tls", action="store_true")
    ap.add_argument("--auth", nargs=2, metavar=("USER", "PASSWORD"))
    ap.add_argument("--reply-delay", type=float, default=0.0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    kwargs = {}
    if args.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*args.tls)
        if args.implicit_tls:
            kwargs["ssl_context"] = ctx
        else:
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = True
    if args.auth:
        kwargs["authenticator"] = authenticator(*args.auth)
        kwargs["auth_required"] = True
        # With implicit TLS aiosmtpd does not see the session as TLS; AUTH is safe either way.
        kwargs["auth_require_tls"] = bool(args.tls) and not args.implicit_tls
    controller = Controller(
        Sink(args.out, args.reply_delay), hostname="127.0.0.1", port=args.port, **kwargs
    )
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
