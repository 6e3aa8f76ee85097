"""A ListObjectsV2-only S3 stand-in for benchmarks/bench_listing.py: a sorted key list in memory,
answers in microseconds per key (prefix, delimiter, max-keys, continuation token, as S3 does),
and waits a fixed delay before each answer, concurrently for concurrent requests. That is the
regime of real S3 (the server scales, a page costs a round trip), which moto on two shared cores
is not (it spends ~0.4 ms of CPU per listed key, one request at a time).

    python -m benchmarks.s3_list_stub --bucket B --prefix set/ --keys 100000 --folders 100 --delay 0.05

prints ``LISTENING http://127.0.0.1:PORT`` once ready; stdin closing stops it. Loopback only.
"""
from __future__ import annotations

import argparse
import bisect
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

from benchmarks._common import listing_keys

_HEAD = ('<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
         '2006-03-01/"><Name>{bucket}</Name><Prefix>{prefix}</Prefix><MaxKeys>{max}</MaxKeys>{delim}'
         '<KeyCount>{count}</KeyCount><IsTruncated>{trunc}</IsTruncated>{token}')
_KEY = ('<Contents><Key>{k}</Key><LastModified>2026-12-01T00:00:00.000Z</LastModified>'
        '<ETag>&quot;d41d8cd98f00b204e9800998ecf8427e&quot;</ETag><Size>0</Size>'
        '<StorageClass>STANDARD</StorageClass></Contents>')


class Store:
    def __init__(self, bucket: str, keys: list[str]):
        self.bucket = bucket
        self.keys = sorted(keys)
        self.xml = [_KEY.format(k=escape(k)) for k in self.keys]

    def page(self, prefix: str, delimiter: str, max_keys: int, after: str) -> str:
        keys = self.keys
        if after and delimiter and after.endswith(delimiter):     # the last page ended on a folder
            i = bisect.bisect_left(keys, after + "\U0010ffff")
        elif after and after >= prefix:
            i = bisect.bisect_right(keys, after)
        else:
            i = bisect.bisect_left(keys, prefix)
        parts, n, last = [], 0, None
        folders = []
        while i < len(keys) and keys[i].startswith(prefix) and n < max_keys:
            k = keys[i]
            rest = k[len(prefix):]
            if delimiter and delimiter in rest:
                cp = prefix + rest.split(delimiter, 1)[0] + delimiter
                folders.append(f"<CommonPrefixes><Prefix>{escape(cp)}</Prefix></CommonPrefixes>")
                last = cp
                i = bisect.bisect_left(keys, cp + "\U0010ffff")     # past every key of the folder
            else:
                parts.append(self.xml[i])
                last = k
                i += 1
            n += 1
        trunc = i < len(keys) and keys[i].startswith(prefix)
        head = _HEAD.format(bucket=self.bucket, prefix=escape(prefix), max=max_keys, count=n,
                            delim=f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "",
                            trunc="true" if trunc else "false",
                            token=(f"<NextContinuationToken>{escape(urllib.parse.quote(last))}"
                                   "</NextContinuationToken>") if trunc else "")
        return head + "".join(parts) + "".join(folders) + "</ListBucketResult>"


def serve(store: Store, delay: float) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            q = dict(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
            if u.path.strip("/") != store.bucket or q.get("list-type") != "2":
                body, status = b"<Error><Code>NotImplemented</Code></Error>", 501
            else:
                time.sleep(delay)
                body = store.page(q.get("prefix", ""), q.get("delimiter", ""), int(q.get("max-keys", 1000)),
                                  urllib.parse.unquote(q.get("continuation-token", ""))).encode()
                status = 200
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", default="bench")
    ap.add_argument("--prefix", default="set/")
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--folders", type=int, default=100, help="0 = a flat prefix")
    ap.add_argument("--delay", type=float, default=0.05)
    a = ap.parse_args()
    srv = serve(Store(a.bucket, listing_keys(a.prefix, a.keys, a.folders)), a.delay)
    print(f"LISTENING http://127.0.0.1:{srv.server_address[1]}", flush=True)
    sys.stdin.read()
    srv.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
