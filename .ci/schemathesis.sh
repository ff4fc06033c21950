#!/usr/bin/env bash
# The OpenAPI document against the server it describes: schemathesis (pinned) with every check,
# stateful links included, on the debug server with the default model, once with the admin key
# and once without. Fails on any failure. About a minute on 2 cores after the build.
#
# The server runs with --max-steps 4: its /openapi.json states the running server's limits, so
# schema-valid requests stay cheap. Image fields carry the document's `image` /
# `base64-image` formats; .ci/schemathesis-hooks.py generates real PNGs for them.
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEMATHESIS_VERSION=4.32.5
VENV="${SCHEMATHESIS_VENV:-target/schemathesis-venv}"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
# Built with the test profile features (as `cargo test` builds it), so nothing recompiles.
cargo test -p rl4pix-server --no-run
PORT="${SCHEMATHESIS_PORT:-18790}"
KEY=schemathesis-admin
LOG="$(mktemp)"
RUST_LOG=warn target/debug/rl4pix-server --port "$PORT" --api-key "$KEY" \
  --max-steps 4 --default-steps 2 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
run() {
  PYTHONPATH=.ci SCHEMATHESIS_HOOKS=schemathesis-hooks "$VENV/bin/schemathesis" run \
    "http://127.0.0.1:$PORT/openapi.json" --checks all --max-examples "${SCHEMATHESIS_EXAMPLES:-30}" \
    --seed "${SCHEMATHESIS_SEED:-17}" --request-timeout 60 "$@"
}
echo "== with the admin key"
run -H "Authorization: Bearer $KEY"
echo "== without a key"
run
