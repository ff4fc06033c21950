"""Schemathesis hooks for rl4pix: strategies for the two image formats the OpenAPI document
names (`image`: the bytes of a form's file part; `base64-image`: the same, base64 in JSON).
JSON Schema cannot say "a decodable PNG", so the document names a format and this file
generates values of it: small random PNGs (standard library only)."""

import base64
import struct
import zlib

import schemathesis
from hypothesis import strategies as st


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, colour: int, grey: bool) -> bytes:
    """An 8-bit PNG (RGB or greyscale) of `width x height`, a gradient tinted by `colour`."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            if grey:
                rows.append((x * 31 + y * 17 + colour) & 0xFF)
            else:
                rows += bytes(((x * 40 + colour) & 0xFF, (y * 40) & 0xFF, colour & 0xFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if grey else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(rows)))
        + _chunk(b"IEND", b"")
    )


IMAGES = st.builds(
    png,
    width=st.integers(1, 24),
    height=st.integers(1, 24),
    colour=st.integers(0, 255),
    grey=st.booleans(),
)

schemathesis.openapi.format("image", IMAGES)
schemathesis.openapi.format(
    "base64-image", IMAGES.map(lambda b: base64.b64encode(b).decode("ascii"))
)


# `Prefer: respond-async` turns `POST /edit` into a job (202 and the links to `/jobs/{id}`). The
# header is free text in the document (RFC 7240: unknown preferences are ignored), so generated
# values would almost never ask for it and stateful testing would not reach the job routes.
@schemathesis.hook.apply_to(path="/edit", method="POST")
def flatmap_headers(context, headers):
    headers = dict(headers or {})
    return st.sampled_from([headers, {**headers, "Prefer": "respond-async"}])


# A multipart form has no arrays: a list goes out as repeated parts (one part, or none at all for
# an empty list), which no server can tell from a plain or a missing field. Schemathesis's
# negative phases still turn a form's string fields into lists and then expect a rejection (a run
# failed on an empty list for `model`, which simply left `model` out), so such forms are not
# generated. No request schema in this API has an array field, and JSON bodies keep every
# mutation.
@schemathesis.hook
def filter_case(context, case):
    body = case.body
    if not (case.media_type or "").startswith("multipart/") or not isinstance(body, dict):
        return True
    return not any(isinstance(value, list) for value in body.values())
