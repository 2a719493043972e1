#!/usr/bin/python3 -I
"""An unauthenticated flood against a shim's TCP port (docs/design.md
"Pre-authentication gate"), for test_flood.py and bench/flood.

  flood.py HOST PORT [--bare N] [--tls N] [--slowloris N] [--source IP]...

  --bare N       TCP connections that never send a byte
  --tls N        TLS 1.3 handshakes with ALPN h2, then silence
  --slowloris N  TLS + h2, then the HTTP/2 client preface one byte a second
  --source IP    bind to these local addresses, round robin (default: none)

Every connection the server closes is opened again at once, as an attacker
keeping the pressure up would. Prints one JSON line {"ready": ...} once each
connection has been opened (and, for TLS, has finished its handshake) once,
then runs until SIGTERM/SIGINT and prints a last JSON line with the counts:
opened, closed by the server, connect errors, and how long each slowloris
connection lasted before the server closed it."""
import argparse
import asyncio
import json
import resource
import signal
import ssl
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Flood:
    def __init__(self, a):
        self.a = a
        self.stats = {"opened": {"bare": 0, "tls": 0, "slowloris": 0},
                      "closed_by_server": {"bare": 0, "tls": 0, "slowloris": 0},
                      "connect_errors": 0, "slowloris_lifetimes_s": []}
        self.first_round = a.bare + a.tls + a.slowloris
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.set_alpn_protocols(["h2"])
        self.n = 0

    def source(self):
        self.n += 1
        return (self.a.source[self.n % len(self.a.source)], 0) if self.a.source else None

    def opened_once(self):
        self.first_round -= 1
        if self.first_round == 0:
            self.ready.set()

    async def one(self, kind):
        first = True
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                r, w = await asyncio.open_connection(
                    self.a.host, self.a.port, local_addr=self.source(),
                    ssl=self.ctx if kind != "bare" else None, server_hostname="shim" if kind != "bare" else None)
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                self.stats["connect_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            self.stats["opened"][kind] += 1
            if first:
                first = False
                self.opened_once()
            try:
                if kind == "slowloris":
                    sender = asyncio.ensure_future(self.trickle(w))
                while await r.read(4096):
                    pass  # the server's SETTINGS; then EOF when it drops us
                self.stats["closed_by_server"][kind] += 1
                if kind == "slowloris":
                    self.stats["slowloris_lifetimes_s"].append(round(time.monotonic() - start, 3))
                    sender.cancel()
            except (OSError, ssl.SSLError):
                self.stats["closed_by_server"][kind] += 1
            finally:
                w.close()

    async def trickle(self, w):
        for b in PREFACE:
            await asyncio.sleep(1)
            w.write(bytes([b]))
            await w.drain()

    async def run(self):
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, self.stop.set)
        tasks = [asyncio.ensure_future(self.one(k)) for k, n in
                 (("bare", self.a.bare), ("tls", self.a.tls), ("slowloris", self.a.slowloris)) for _ in range(n)]
        await asyncio.wait([asyncio.ensure_future(self.ready.wait()), asyncio.ensure_future(self.stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if self.ready.is_set():
            print(json.dumps({"ready": self.stats["opened"]}), flush=True)
        await self.stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print(json.dumps(self.stats), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bare", type=int, default=0)
    p.add_argument("--tls", type=int, default=0)
    p.add_argument("--slowloris", type=int, default=0)
    p.add_argument("--source", action="append", default=[])
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = a.bare + a.tls + a.slowloris + 64
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    asyncio.run(Flood(a).run())


if __name__ == "__main__":
    sys.exit(main())
