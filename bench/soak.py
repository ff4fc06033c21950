#!/usr/bin/env python3
"""Soak test for a running rl4pix server (Python standard library only).

Mixed load for --minutes (default 10): synchronous edits, async jobs (some cancelled), bad
inputs (corrupt images, unknown adapters), decompression bombs, slow clients that send half a
request header and hold the connection, and adapter swaps through the admin API. Reports failed
good requests, the server's RSS over time (from /proc/PID/status) and p50/p99 latency of the
good synchronous edits. Exits non-zero on any failed good request, or when RSS after the
warm-up (the first fifth of the run) grows more than 10% over its value at the end of warm-up.

    python3 bench/soak.py --url http://127.0.0.1:8080 --pid $(pgrep -n rl4pix-server) \
        --minutes 10 --admin-key KEY --adapter-file tests/fixtures/pipelines/sd1.lora.safetensors

A good request answered 429 or 503 (load shedding, with Retry-After) is counted as shed, not
failed; any other non-2xx answer, or a connection error, to a good request is a failure. Bad
requests must get a 4xx; a 5xx or a dropped connection there is a failure too.
"""

import argparse
import json
import os
import random
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, seed, extra=b""):
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            rows += bytes(((x * 9 + seed) & 255, (y * 7) & 255, (seed * 13) & 255))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra
            + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b""))


def bomb():
    """A 32x32 PNG whose iCCP chunk inflates to 400 MiB (about 400 KB on the wire)."""
    profile = zlib.compress(b"\0" * (400 << 20), 9)
    return png(32, 32, 1, chunk(b"iCCP", b"icc\0\0" + profile))


def multipart(fields, files):
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, data) in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []
        self.latencies = []

    def count(self, what):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def fail(self, what, detail):
        with self.lock:
            self.counts[what + ":failed"] = self.counts.get(what + ":failed", 0) + 1
            if len(self.failures) < 50:
                self.failures.append(f"{what}: {detail}")


def request(method, url, body=None, headers=None, timeout=120):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class Soak:
    def __init__(self, args):
        self.args = args
        self.url = args.url.rstrip("/")
        self.stats = Stats()
        self.stop = threading.Event()
        self.bomb = bomb()
        self.adapter_bytes = open(args.adapter_file, "rb").read() if args.adapter_file else None

    def edit_body(self, seed, adapter=None, image=None):
        fields = {"instruction": "make the square blue", "steps": str(self.args.steps), "seed": str(seed)}
        if adapter:
            fields["adapter"] = adapter
        return multipart(fields, {"image": ("in.png", image or png(40, 24, seed))})

    def good(self, what, status, detail=b""):
        if 200 <= status < 300:
            self.stats.count(what)
            return True
        if status in (429, 503):
            self.stats.count(what + ":shed")
            return False
        self.stats.fail(what, f"{status} {detail[:200]!r}")
        return False

    def loop(self, what, step, pause):
        while not self.stop.is_set():
            try:
                step()
            except Exception as e:  # a dropped connection or a timeout is a failure
                self.stats.fail(what, repr(e)[:200])
            self.stop.wait(pause)

    def sync_edit(self):
        body, ctype = self.edit_body(random.randrange(1 << 30))
        started = time.monotonic()
        status, data, _ = request("POST", self.url + "/edit", body, {"Content-Type": ctype})
        if self.good("sync_edit", status, data):
            with self.stats.lock:
                self.stats.latencies.append(time.monotonic() - started)

    def async_job(self):
        body, ctype = self.edit_body(random.randrange(1 << 30))
        status, data, _ = request("POST", self.url + "/edit", body,
                                  {"Content-Type": ctype, "Prefer": "respond-async"})
        if not self.good("async_submit", status, data):
            return
        job = json.loads(data)
        if random.random() < 0.3:
            status, data, _ = request("DELETE", self.url + job["status_url"])
            # Cancelling a job that already finished answers 409; both are fine.
            if status not in (200, 409):
                self.stats.fail("async_cancel", f"{status} {data[:200]!r}")
            else:
                self.stats.count("async_cancel")
            return
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status, data, _ = request("GET", self.url + job["status_url"])
            if status != 200:
                self.stats.fail("async_status", f"{status} {data[:200]!r}")
                return
            state = json.loads(data)["status"]
            if state in ("done", "failed", "cancelled"):
                break
            time.sleep(0.2)
        status, data, _ = request("GET", self.url + job["result_url"])
        self.good("async_result", status, data)

    def expect_4xx(self, what, status, data):
        if 400 <= status < 500:
            self.stats.count(what)
        else:
            self.stats.fail(what, f"expected 4xx, got {status} {data[:200]!r}")

    def bad_input(self):
        choice = random.randrange(3)
        if choice == 0:
            corrupt = bytearray(png(40, 24, 3))
            corrupt[60:80] = os.urandom(20)
            body, ctype = self.edit_body(1, image=bytes(corrupt))
            status, data, _ = request("POST", self.url + "/edit", body, {"Content-Type": ctype})
            # A flipped byte may land in an ancillary place and still decode: 200 is fine then.
            if status != 200:
                self.expect_4xx("bad_corrupt_image", status, data)
        elif choice == 1:
            body, ctype = self.edit_body(1, adapter="no-such-adapter-%d" % random.randrange(1000))
            status, data, _ = request("POST", self.url + "/edit", body, {"Content-Type": ctype})
            self.expect_4xx("bad_unknown_adapter", status, data)
        else:
            body, ctype = multipart({"instruction": "x"}, {"image": ("in.png", b"not an image")})
            status, data, _ = request("POST", self.url + "/edit", body, {"Content-Type": ctype})
            self.expect_4xx("bad_not_an_image", status, data)

    def decompression_bomb(self):
        body, ctype = self.edit_body(1, image=self.bomb)
        status, data, _ = request("POST", self.url + "/edit", body, {"Content-Type": ctype})
        if status >= 500 and status not in (503,):
            self.stats.fail("bomb", f"{status} {data[:200]!r}")
        else:
            self.stats.count("bomb")

    def slow_client(self):
        host, port = urllib.parse.urlsplit(self.url).hostname, urllib.parse.urlsplit(self.url).port
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /edit HTTP/1.1\r\nHost: soak\r\n")
            s.settimeout(self.args.slow_hold_s)
            try:
                closed = s.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                closed = False
            self.stats.count("slow_client_closed_by_server" if closed else "slow_client_held")

    def adapter_swap(self):
        key = {"Authorization": "Bearer " + self.args.admin_key}
        name = "soak-%d" % random.randrange(3)
        body, ctype = multipart({"name": name}, {"file": (name + ".safetensors", self.adapter_bytes)})
        status, data, _ = request("POST", self.url + "/adapters", body, dict(key, **{"Content-Type": ctype}))
        if not self.good("adapter_upload", status, data):
            return
        body, ctype = self.edit_body(random.randrange(1 << 30), adapter=name)
        status, data, _ = request("POST", self.url + "/edit", body, {"Content-Type": ctype})
        # Another swap may have deleted it meanwhile: 404 is a fair answer then.
        if status != 404:
            self.good("adapter_edit", status, data)
        if random.random() < 0.5:
            status, data, _ = request("DELETE", self.url + "/adapters/" + name, headers=key)
            if status not in (200, 404):
                self.stats.fail("adapter_delete", f"{status} {data[:200]!r}")

    def rss_kib(self):
        with open(f"/proc/{self.args.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def run(self):
        a = self.args
        plan = [("sync_edit", self.sync_edit, 0.0, a.sync_workers),
                ("async_job", self.async_job, 0.2, 2),
                ("bad_input", self.bad_input, 0.3, 1),
                ("bomb", self.decompression_bomb, 2.0, 1),
                ("slow_client", self.slow_client, 0.5, 2)]
        if self.adapter_bytes and a.admin_key:
            plan.append(("adapter_swap", self.adapter_swap, 1.0, 1))
        threads = [threading.Thread(target=self.loop, args=(what, step, pause), daemon=True)
                   for what, step, pause, n in plan for _ in range(n)]
        for t in threads:
            t.start()
        duration = a.minutes * 60
        started = time.monotonic()
        samples = []
        while time.monotonic() - started < duration:
            samples.append((time.monotonic() - started, self.rss_kib()))
            print(f"t={samples[-1][0]:6.0f}s rss={samples[-1][1] / 1024:7.1f} MiB "
                  f"{json.dumps(self.stats.counts, sort_keys=True)}", flush=True)
            time.sleep(a.sample_s)
        self.stop.set()
        for t in threads:
            t.join(timeout=a.slow_hold_s + 130)
        samples.append((time.monotonic() - started, self.rss_kib()))
        return self.report(samples, duration)

    def report(self, samples, duration):
        warm = [s for s in samples if s[0] <= duration / 5]
        after = [s for s in samples if s[0] > duration / 5]
        base = warm[-1][1] if warm else samples[0][1]
        peak = max((s[1] for s in after), default=base)
        growth = (peak - base) / base if base else 0.0
        lat = sorted(self.stats.latencies)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")
        failed = sum(v for k, v in self.stats.counts.items() if k.endswith(":failed"))
        print("\n== soak report")
        print(f"duration: {duration:.0f} s; requests by kind: {json.dumps(self.stats.counts, sort_keys=True)}")
        print(f"sync edits: {len(lat)} ok, latency p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms")
        print(f"RSS: {base / 1024:.1f} MiB after warm-up, peak after it {peak / 1024:.1f} MiB "
              f"({growth * 100:+.1f}%), at the end {samples[-1][1] / 1024:.1f} MiB; samples (s, MiB): "
              + ", ".join(f"{t:.0f}:{r / 1024:.0f}" for t, r in samples))
        print(f"failed requests: {failed}")
        for line in self.stats.failures:
            print("  " + line)
        ok = failed == 0 and growth <= 0.10
        print("RESULT:", "pass" if ok else "FAIL")
        return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--pid", type=int, required=True, help="the server's process id (for RSS)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--sync-workers", type=int, default=3)
    p.add_argument("--admin-key", default=None)
    p.add_argument("--adapter-file", default=None, help="a valid adapter to upload (swaps)")
    p.add_argument("--slow-hold-s", type=float, default=20.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    sys.exit(Soak(p.parse_args()).run())


if __name__ == "__main__":
    main()
