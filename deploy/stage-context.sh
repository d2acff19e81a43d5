#!/usr/bin/env bash
# Copy exactly what deploy/Dockerfile needs into DIR: a small, secret-free build context
# (`docker build` otherwise sends the whole checkout, .venv and data included, to the daemon).
# Usage: deploy/stage-context.sh DIR   then   docker build -f DIR/deploy/Dockerfile DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: stage-context.sh DIR}
mkdir -p "$DIR/deploy/tls" "$DIR/deploy/keys" "$DIR/deploy/wheelhouse"
cp pyproject.toml README.md constraints.txt "$DIR/"
for pkg in recon strategies server client fedunroll; do
    rsync -a --exclude __pycache__ --exclude '*.pyc' "$pkg/" "$DIR/$pkg/" 2>/dev/null ||
        { mkdir -p "$DIR/$pkg" && cp -a "$pkg/." "$DIR/$pkg/" && find "$DIR/$pkg" -name __pycache__ -prune -exec rm -rf {} +; }
done
cp deploy/Dockerfile deploy/entrypoint.sh "$DIR/deploy/"
cp deploy/tls/make-certs.sh "$DIR/deploy/tls/"
cp deploy/keys/make-node-keys.sh "$DIR/deploy/keys/"
# Hard links: the wheelhouse is large and read-only here.
if [[ -d deploy/wheelhouse ]]; then
    cp -al deploy/wheelhouse/. "$DIR/deploy/wheelhouse/" 2>/dev/null ||
        cp -a deploy/wheelhouse/. "$DIR/deploy/wheelhouse/"
fi
echo "$DIR"
