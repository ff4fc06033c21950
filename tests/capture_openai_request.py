#!/usr/bin/env python3
"""Records the exact HTTP request the official `openai` Python SDK sends for
`client.images.edit(...)`, as a fixture that `server/tests/openai.rs` replays against the real
server.

The SDK talks to a small local HTTP server that keeps the raw request (method, path, headers and
the multipart body byte for byte) and answers like OpenAI would, so nothing leaves the machine.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install openai==3.51.0
    /tmp/venv/bin/python tests/capture_openai_request.py

writes tests/fixtures/openai/images_edit.json (request line and headers) and
tests/fixtures/openai/images_edit.body (the body).
"""

import base64
import json
import pathlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGE = ROOT / "model/assets/toy/grid/7-input.png"
OUT = ROOT / "tests/fixtures/openai"
API_KEY = "sk-rl4pix-fixture"

captured = []


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the stdlib's name)
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        captured.append(
            {
                "method": self.command,
                "path": self.path,
                "http_version": self.request_version,
                # In the order sent; the names as the SDK spelled them.
                "headers": [[k, v] for k, v in self.headers.items()],
                "body": body,
            }
        )
        answer = json.dumps(
            {
                "created": 0,
                "data": [{"b64_json": base64.b64encode(IMAGE.read_bytes()).decode()}],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client = openai.OpenAI(
        api_key=API_KEY, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
    )
    with IMAGE.open("rb") as image:
        result = client.images.edit(
            image=image,
            prompt="colour the square orange",
            model="toy",
            n=1,
            size="128x128",
            response_format="b64_json",
            # rl4pix's own field, for a reproducible replay.
            extra_body={"seed": 7},
        )
    server.shutdown()
    assert len(result.data) == 1 and result.data[0].b64_json, result
    (request,) = captured
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "images_edit.body").write_bytes(request.pop("body"))
    request["sdk"] = f"openai-python {openai.__version__}"
    request["body_file"] = "images_edit.body"
    (OUT / "images_edit.json").write_text(json.dumps(request, indent=2) + "\n")
    print(f"recorded {request['method']} {request['path']} from {request['sdk']} into {OUT}")


if __name__ == "__main__":
    main()
