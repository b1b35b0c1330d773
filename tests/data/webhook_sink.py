"""A real HTTP server for keywatch's webhook tests (Python's http.server, on loopback).

usage: webhook_sink.py PORT DIR [--secret SECRET] [--fail-first N]

Every POST is written to DIR as N.json: its path, headers, the body parsed as JSON, and, with
--secret, whether the X-Keywatch-Signature header is the HMAC-SHA256 of "{timestamp}.{body}"
under that secret (computed here, independently of keywatch). The first N requests are
answered 503, the rest 200. Prints "ready" when it listens.
"""
import argparse
import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--secret")
    ap.add_argument("--fail-first", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lock = threading.Lock()
    seen = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                seen[0] += 1
                n = seen[0]
            ok = None
            if args.secret is not None:
                ts = self.headers.get("X-Keywatch-Timestamp", "")
                want = "sha256=" + hmac.new(
                    args.secret.encode(), ts.encode() + b"." + body, hashlib.sha256
                ).hexdigest()
                ok = hmac.compare_digest(want, self.headers.get("X-Keywatch-Signature", ""))
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            doc = {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": parsed,
                "signature_ok": ok,
                "answered": 503 if n <= args.fail_first else 200,
            }
            name = f"{time.time_ns()}-{n:04}"
            tmp = os.path.join(args.out, name + ".json.tmp")
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.rename(tmp, os.path.join(args.out, name + ".json"))
            self.send_response(doc["answered"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
