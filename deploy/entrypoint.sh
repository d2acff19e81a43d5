#!/usr/bin/env bash
# fedunroll image entry point: one image, several roles, chosen by the first argument.
#
#   superlink   make the CA + server certificate if absent, publish ca.crt, run
#               flower-superlink (TLS + node authentication, or --insecure), process isolation
#   superexec   flower-superexec: the server-side executor that runs the ServerApp
#   supernode   one hospital: synthetic data if its volume is empty (SYNTH=1), its key pair if
#               absent (public key published for registration), then flower-supernode (the
#               ClientApp runs in this container), restarted while the SuperLink refuses it
#   run         register the sites' public keys, `flwr run` the app, wait, check results.json
#   prepare     fedunroll prepare SITE_DIR... (raw fastMRI h5 -> cached coil maps)
#   healthcheck the SuperLink's /health answers (over TLS unless INSECURE=1)
#   certs DIR / keys N DIR   the make-certs / make-node-keys scripts
#   anything else is executed as is (fedunroll ..., flwr ..., bash)
#
# Environment (defaults in brackets): INSECURE [0], TLS_DIR [/tls], CA_DIR [/ca],
# PUBKEYS_DIR [/pubkeys], SUPERLINK [superlink:8000], SITES [3], SITE_INDEX / SITE_ID,
# NODE_KEY [/keys/node.key], DATA_PATH [/data], STATE_PATH (writable per-site state, e.g.
# Scaffold's c_k, when the data are mounted read-only), DEVICE [auto], GLEAM_DEVICES (P-GLEAM:
# 'cuda:0,cuda:1' spreads a train.method=gleam model over the site's GPUs), SYNTH [0], JOIN_TIMEOUT [600],
# ROUNDS [3], LOCAL_STEPS [10], MIN_SITES [$SITES], RUN_NAME, RUN_CONFIG ('key=value ...'),
# RESULTS [/results].
set -euo pipefail

INSECURE=${INSECURE:-0}
TLS_DIR=${TLS_DIR:-/tls}
CA_DIR=${CA_DIR:-/ca}
PUBKEYS_DIR=${PUBKEYS_DIR:-/pubkeys}
SUPERLINK=${SUPERLINK:-superlink:8000}
SITES=${SITES:-3}
APP_DIR=${APP_DIR:-/opt/fedunroll/app}
SCRIPTS=/opt/fedunroll/scripts
ROLE=${1:-help}

say() { printf '[fedunroll %s] %s\n' "$ROLE" "$*" >&2; }
tls_on() { [[ $INSECURE != 1 && $INSECURE != true ]]; }

ca_file() {
    if [[ -s $CA_DIR/ca.crt ]]; then echo "$CA_DIR/ca.crt"; else echo "$TLS_DIR/ca.crt"; fi
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || {
            say "timed out waiting for $what"
            return 1
        }
        sleep 1
    done
}

# `flwr` CLI connection "superlink" in a private FLWR_HOME (run role).
write_connection() {
    export FLWR_HOME=${FLWR_CLI_HOME:-/tmp/flwr-cli}
    mkdir -p "$FLWR_HOME"
    {
        echo '[superlink]'
        echo 'default = "superlink"'
        echo
        echo '[superlink.superlink]'
        echo "address = \"$SUPERLINK\""
        if tls_on; then
            echo "root-certificates = \"$(ca_file)\""
        else
            echo 'insecure = true'
        fi
    } >"$FLWR_HOME/config.toml"
}

site_index() {
    if [[ -n ${SITE_INDEX:-} ]]; then
        echo "$SITE_INDEX"
    elif [[ ${SITE_ID:-} =~ ([0-9]+)$ ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo 0
    fi
}

role_superlink() {
    local state=${STATE_DIR:-/state}
    local args=(--host 0.0.0.0 --port "${SUPERLINK_PORT:-8000}" --database "$state/state.db"
        --disable-runtime-dependency-installation --isolation "${SUPERLINK_ISOLATION:-process}")
    mkdir -p "$state"
    if tls_on; then
        bash "$SCRIPTS/make-certs.sh" "$TLS_DIR" >&2
        # Publish the CA certificate (public) to the other containers; the keys stay here.
        if [[ -d $CA_DIR ]]; then
            cp "$TLS_DIR/ca.crt" "$CA_DIR/.ca.crt" && mv "$CA_DIR/.ca.crt" "$CA_DIR/ca.crt"
        fi
        args+=(--ssl-ca-certfile "$TLS_DIR/ca.crt" --ssl-certfile "$TLS_DIR/server.crt"
            --ssl-keyfile "$TLS_DIR/server.key" --enable-supernode-auth)
        if [[ -s $TLS_DIR/superexec.secret && ${args[*]} == *"--isolation process"* ]]; then
            args+=(--superexec-auth-secret-file "$TLS_DIR/superexec.secret")
        fi
    else
        say "WARNING: insecure mode (no TLS, no node authentication): for debugging only"
        args+=(--insecure)
    fi
    exec flower-superlink "${args[@]}" "$@"
}

role_superexec() {
    local args=(--runtime-api-address "$SUPERLINK")
    if tls_on; then
        wait_for 120 "$TLS_DIR/ca.crt" test -s "$TLS_DIR/ca.crt"
        args+=(--root-certificates "$TLS_DIR/ca.crt")
        [[ -s $TLS_DIR/superexec.secret ]] &&
            args+=(--superexec-auth-secret-file "$TLS_DIR/superexec.secret")
    else
        args+=(--insecure)
    fi
    exec flower-superexec "${args[@]}" "$@"
}

synth_site() { # synth_site INDEX DIR: synthetic site INDEX (deterministic) into DIR
    python3 - "$1" "$2" <<'PY'
import os
import shutil
import sys
import tempfile
from pathlib import Path

from recon.data import generate_sites, prepare_site

k, dest = int(sys.argv[1]), Path(sys.argv[2])
slices = int(os.environ.get("SYNTH_SLICES", "20"))
matrix = int(os.environ.get("SYNTH_MATRIX", "32"))
coils = int(os.environ.get("SYNTH_COILS", "4"))
print(
    f"[fedunroll supernode] generating synthetic site{k} in {dest} "
    f"({slices} slices, {matrix}x{matrix}, {coils} coils)",
    file=sys.stderr,
    flush=True,
)
with tempfile.TemporaryDirectory() as tmp:
    # Sites 0..k are generated (each depends on the seed and its index only); k is kept.
    generate_sites(tmp, n_sites=k + 1, n_slices=slices, matrix=matrix, overrides={"num_coils": coils})
    for item in Path(tmp, f"site{k}").iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)
prepare_site(dest, progress=False)
PY
}

role_supernode() {
    local k
    k=$(site_index)
    local site_id=${SITE_ID:-site$k}
    if ((k >= SITES)); then
        say "$site_id is not part of this federation (SITES=$SITES): idle"
        exec sleep infinity
    fi
    local data=${DATA_PATH:-/data}
    if [[ -z $(ls -A "$data" 2>/dev/null) ]]; then
        if [[ ${SYNTH:-0} == 1 ]]; then
            mkdir -p "$data"
            synth_site "$k" "$data"
        else
            say "no site data at $data (mount the site's folder there)"
            return 1
        fi
    fi
    local args=(--superlink "$SUPERLINK" --port "${CLIENTAPPIO_PORT:-9094}"
        --node-config "data-path=\"$data\" site-id=\"$site_id\" device=\"${DEVICE:-auto}\"${STATE_PATH:+ state-path=\"$STATE_PATH\"}${GLEAM_DEVICES:+ gleam-devices=\"$GLEAM_DEVICES\"}")
    if tls_on; then
        local key=${NODE_KEY:-/keys/node.key}
        if [[ ! -s $key ]]; then # first start: this site's key pair; the private key stays here
            bash "$SCRIPTS/make-node-keys.sh" --name "$(basename "$key")" "$(dirname "$key")" >&2
        fi
        if [[ -d $PUBKEYS_DIR && -w $PUBKEYS_DIR ]]; then # publish the public key only
            cp "$key.pub" "$PUBKEYS_DIR/.$site_id.pub"
            mv "$PUBKEYS_DIR/.$site_id.pub" "$PUBKEYS_DIR/$site_id.pub"
        fi
        wait_for 120 "the CA certificate" test -s "$(ca_file)"
        args+=(--root-certificates "$(ca_file)" --auth-supernode-private-key "$key")
    else
        args+=(--insecure)
    fi
    say "$site_id -> $SUPERLINK (data $data, device ${DEVICE:-auto}${GLEAM_DEVICES:+, gleam devices $GLEAM_DEVICES})"
    # Until its key is registered the SuperLink refuses the node (flower-supernode exits with
    # 305 & 255 = 49); retry for a bounded time. A SuperNode told to stop exits 0.
    local deadline=$((SECONDS + ${JOIN_TIMEOUT:-600})) rc child
    trap '[[ -n ${child:-} ]] && kill -TERM "$child" 2>/dev/null; wait; exit 0' TERM INT
    while true; do
        flower-supernode "${args[@]}" "$@" &
        child=$!
        rc=0
        wait "$child" || rc=$?
        ((rc == 0)) && return 0
        if ((SECONDS >= deadline)); then
            say "flower-supernode exit code $rc; not accepted within ${JOIN_TIMEOUT:-600} s"
            return "$rc"
        fi
        say "flower-supernode exit code $rc (key not registered yet?); retrying in 5 s"
        sleep 5
    done
}

register_sites() { # the public keys the first $SITES sites published
    tls_on || return 0
    local k pub out
    for ((k = 0; k < SITES; k++)); do
        pub=$PUBKEYS_DIR/site$k.pub
        wait_for "${JOIN_TIMEOUT:-600}" "$pub (site$k's public key)" test -s "$pub"
        if out=$(flwr supernode register "$pub" superlink 2>&1); then
            say "registered site$k's key"
        elif grep -qiE 'already|exist' <<<"$out"; then
            say "site$k's key was already registered"
        else
            say "registering site$k failed: $out"
            return 1
        fi
    done
}

role_run() {
    write_connection
    local results=${RESULTS:-/results}
    local name=${RUN_NAME:-compose-$(date -u +%Y%m%d-%H%M%S)}
    local min=${MIN_SITES:-$SITES}
    local cfg=/tmp/run_config.toml
    {
        echo "\"run.out\" = \"$results\""
        echo "\"run.name\" = \"$name\""
        echo "\"data.num-sites\" = $SITES"
        echo "\"min-fit-clients\" = $min"
        echo "\"min-available-clients\" = $min"
        echo "\"num-server-rounds\" = ${ROUNDS:-3}"
        echo "\"train.local-steps\" = ${LOCAL_STEPS:-10}"
        echo "\"model.num-unrolls\" = ${NUM_UNROLLS:-2}"
        echo "\"model.cg-iters\" = ${CG_ITERS:-2}"
        echo "\"model.unet-chans\" = ${UNET_CHANS:-8}"
        echo "\"round-timeout\" = ${ROUND_TIMEOUT:-300.0}"
        echo "\"node-wait-timeout\" = ${NODE_WAIT_TIMEOUT:-300.0}"
        echo "\"run.local-only\" = false"
        local kv
        for kv in ${RUN_CONFIG:-}; do echo "\"${kv%%=*}\" = ${kv#*=}"; done
    } >"$cfg"
    say "run $name: $SITES sites (at least $min); run config:"
    sed 's/^/    /' "$cfg" >&2
    if tls_on; then wait_for 120 "the CA certificate" test -s "$(ca_file)"; fi
    write_connection
    wait_for 120 "the SuperLink at $SUPERLINK" flwr ls superlink
    register_sites
    local rc=0
    flwr run "$APP_DIR" superlink --stream --run-config "$cfg" || rc=$?
    local res=$results/$name/results.json
    wait_for 30 "$res" test -s "$res" || true
    if [[ ! -s $res ]]; then
        say "no $res (flwr run exit code $rc)"
        return 1
    fi
    python3 - "$res" <<'PY'
import json
import sys

res = json.load(open(sys.argv[1]))
print(f"[fedunroll run] {sys.argv[1]}: status={res['status']} sites={res['sites']}", flush=True)


def fmt(m):
    return " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, int | float))


for r in res["rounds"]:
    for site, m in sorted(r["train"].items()):
        print(f"[fedunroll run] round {r['round']} {site}: trained {fmt(m)}")
    for site, m in sorted(r["eval"].items()):
        print(f"[fedunroll run] round {r['round']} {site}: evaluated {fmt(m)}")
    for rej in r.get("rejected", []):
        print(f"[fedunroll run] round {r['round']} {rej['site']}: rejected: {rej['reason']}")
for site, m in sorted(res.get("final", {}).get("federated", {}).items()):
    print(f"[fedunroll run] final {site}: {fmt(m)}")
sys.exit(0 if res["status"] == "completed" else 1)
PY
}

[[ $# -gt 0 ]] && shift
case $ROLE in
superlink) role_superlink "$@" ;;
superexec) role_superexec "$@" ;;
supernode) role_supernode "$@" ;;
run) role_run ;;
healthcheck)
    port=${SUPERLINK_PORT:-8000}
    if tls_on; then
        url=https://localhost:$port/health verify=$TLS_DIR/ca.crt
    else
        url=http://localhost:$port/health verify=
    fi
    exec python3 -c "import ssl, sys, httpx
v = ssl.create_default_context(cafile=sys.argv[2]) if sys.argv[2] else True
sys.exit(0 if httpx.get(sys.argv[1], verify=v, timeout=3).is_success else 1)" "$url" "$verify"
    ;;
prepare) exec fedunroll prepare "$@" ;;
certs) exec bash "$SCRIPTS/make-certs.sh" "$@" ;;
keys) exec bash "$SCRIPTS/make-node-keys.sh" "$@" ;;
help | --help | -h) sed -n '2,21p' "$0" ;;
*) exec "$ROLE" "$@" ;;
esac
