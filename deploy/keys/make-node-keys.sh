#!/usr/bin/env bash
# Per-site SuperNode authentication keys: ECDSA P-384 in OpenSSH format (what Flower loads).
#
#   DIR/site{k}      private key: stays at hospital k (mounted into its SuperNode only)
#   DIR/site{k}.pub  public key: registered at the SuperLink (`flwr supernode register`)
#
# Idempotent: an existing key is never overwritten. Uses ssh-keygen when installed, else
# Python's `cryptography` (a dependency of flwr, so it exists wherever fedunroll does).
#
# Usage: deploy/keys/make-node-keys.sh N [DIR]   (sites 0..N-1; DIR defaults to this folder)
#        deploy/keys/make-node-keys.sh --name NAME [DIR]   (one key called NAME)
set -euo pipefail
if [[ ${1:-} == --name ]]; then
    NAMES=("${2:?--name needs a name}")
    DIR=${3:-$(dirname "$0")}
else
    N=${1:?usage: make-node-keys.sh N [DIR]}
    [[ $N =~ ^[0-9]+$ ]] || {
        echo "make-node-keys: N must be a number, got '$N'" >&2
        exit 2
    }
    NAMES=()
    for ((k = 0; k < N; k++)); do NAMES+=("site$k"); done
    DIR=${2:-$(dirname "$0")}
fi
mkdir -p "$DIR"
umask 077
PY=${PYTHON:-python3}

for name in "${NAMES[@]}"; do
    key=$DIR/$name
    if [[ -s $key && -s $key.pub ]]; then
        continue
    fi
    rm -f "$key" "$key.pub"
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$key"
    else
        "$PY" - "$key" "$name" <<'EOF'
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, name = Path(sys.argv[1]), sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
path.write_bytes(
    key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
)
pub = key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
)
Path(f"{path}.pub").write_bytes(pub + f" {name}\n".encode())
EOF
    fi
    chmod 600 "$key"
    chmod 644 "$key.pub"
    echo "make-node-keys: wrote $key and $key.pub"
done
