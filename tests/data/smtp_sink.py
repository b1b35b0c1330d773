"""A real SMTP server for keywatch's delivery tests (aiosmtpd, on loopback).

usage: smtp_sink.py PORT DIR

Every message accepted is written to DIR as N.eml (the raw message) and N.json (envelope
recipients, headers, and the decoded plain-text and HTML parts), each renamed into place
once complete. Prints "ready" when it listens.
"""
import email
import email.policy
import json
import os
import sys
import time

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, out):
        self.out = out

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
        return "250 OK queued"


def main():
    port, out = int(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    controller = Controller(Sink(out), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
