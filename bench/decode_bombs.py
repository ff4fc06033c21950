#!/usr/bin/env python3
"""Peak memory of the server under PNG decompression bombs.

Starts the server binary (default model), sends one ordinary edit to warm it up, reads its peak
RSS (VmHWM in /proc/PID/status), then sends N concurrent edits, each a 32x32 PNG whose iCCP
chunk inflates to 400 MiB, and reads the peak again. Prints one JSON line: the peak before and
after, the difference, and the statuses the bombs got. Standard library only.

    python3 bench/decode_bombs.py --server target/release/rl4pix-server [--bombs 20]
"""

import argparse
import http.client
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib


def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int, height: int, extra: bytes = b"") -> bytes:
    rows = b"".join(
        b"\0" + b"".join(bytes((x * 7 % 256, y * 9 % 256, 120)) for x in range(width))
        for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + extra
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def iccp_bomb(inflated: int) -> bytes:
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = []
    for _ in range(inflated // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())
    return png(32, 32, chunk(b"iCCP", b"bomb\0\0" + b"".join(parts)))


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "rl4pixbench"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"in.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + image + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"instruction\"\r\n\r\n"
        "make the square blue\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"steps\"\r\n\r\n2\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post_edit(host: str, port: int, image: bytes) -> int:
    body, content_type = multipart(image)
    conn = http.client.HTTPConnection(host, port, timeout=300)
    conn.request("POST", "/edit", body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="target/release/rl4pix-server")
    parser.add_argument("--bombs", type=int, default=20)
    parser.add_argument("--inflated-mib", type=int, default=400)
    args = parser.parse_args()

    bomb = iccp_bomb(args.inflated_mib << 20)
    server = subprocess.Popen(
        [args.server, "--port", "0"],
        stdout=subprocess.PIPE,
        env={**os.environ, "RUST_LOG": "warn"},
        text=True,
    )
    try:
        address = None
        for line in server.stdout:
            if line.startswith("rl4pix-server listening on "):
                address = line.split("http://", 1)[1].strip()
                break
        if address is None:
            sys.exit("the server did not start")
        host, port = address.rsplit(":", 1)
        port = int(port)
        warm = post_edit(host, port, png(32, 32))
        time.sleep(0.5)
        before = peak_rss_mb(server.pid)

        statuses = [None] * args.bombs
        def send(i: int) -> None:
            statuses[i] = post_edit(host, port, bomb)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(args.bombs)]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - started
        after = peak_rss_mb(server.pid)
        print(json.dumps({
            "bomb_bytes": len(bomb),
            "bomb_inflates_mib": args.inflated_mib,
            "concurrent": args.bombs,
            "warm_up_status": warm,
            "bomb_statuses": sorted(set(statuses)),
            "seconds": round(seconds, 2),
            "peak_rss_before_mb": round(before, 1),
            "peak_rss_after_mb": round(after, 1),
            "peak_rss_increase_mb": round(after - before, 1),
        }))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
