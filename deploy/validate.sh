#!/usr/bin/env bash
# Validates deploy/ (see validate.py) with pinned tools; no cluster and no network beyond PyPI.
# kustomize is the one built into kubectl (part of the build machines' image).
set -euo pipefail
cd "$(dirname "$0")"
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! command -v kubectl >/dev/null; then
    echo "deploy/validate.sh: kubectl (for its built-in kustomize) is not installed" >&2
    exit 1
fi
if [ "$(python3 -c 'import kubernetes_validate; print(kubernetes_validate.__version__)' 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
python3 validate.py --self-test
