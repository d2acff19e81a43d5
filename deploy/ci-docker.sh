#!/usr/bin/env bash
# Make a Docker engine reachable and build the fedunroll image on a machine WITHOUT an image
# registry (the CI machine): every step is idempotent and skipped when its product exists.
#
#   1. engine: apt-get install docker.io docker-compose debootstrap (if missing)
#   2. daemon: start dockerd in the background if `docker info` fails (log: $DOCKERD_LOG)
#   3. base image: debootstrap Debian $DEBIAN_SUITE (minbase + python3.11, venv, openssl,
#      ca-certificates) and `docker import` it as $BASE_IMAGE (skipped if the image exists),
#      from $DEBIAN_MIRROR or else the Debian mirror this machine's apt uses for that suite
#   4. wheelhouse: the project's wheel + every dependency at the versions of the tested venv
#      (`pip freeze` of $VENV as constraints), in deploy/wheelhouse (reused if complete)
#   5. image: docker build --build-arg BASE_IMAGE=$BASE_IMAGE -t $IMAGE (offline install)
#
# Each step's wall time goes to stdout and to $TIMINGS (one "step seconds" line each).
# Usage: deploy/ci-docker.sh [--no-build | --print-mirror]
#   env: IMAGE, BASE_IMAGE, VENV, DOCKER_STORAGE_DRIVER, DEBIAN_MIRROR, DEBIAN_SUITE, APT_ETC
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

IMAGE=${IMAGE:-fedunroll:latest}
BASE_IMAGE=${BASE_IMAGE:-fedunroll-base:bookworm}
VENV=${VENV:-$ROOT/.venv}
WHEELHOUSE=$ROOT/deploy/wheelhouse
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/fedunroll-dockerd.log}
TIMINGS=${TIMINGS:-$ROOT/deploy/.ci-docker-times}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
APT_ETC=${APT_ETC:-/etc/apt} # where apt's sources are read from
BUILD=1
[[ ${1:-} == --no-build ]] && BUILD=0

log() { printf '[ci-docker] %s\n' "$*"; }

apt_mirror() { # the first enabled `deb` source of apt that carries $DEBIAN_SUITE, or nothing
    local f m
    # One-line format: deb [options] URI SUITE COMPONENTS...
    for f in "$APT_ETC/sources.list" "$APT_ETC"/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        m=$(awk -v suite="$DEBIAN_SUITE" '
            { sub(/#.*/, "") }
            $1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite && $i ~ /^(https?|file):/) { print $i; exit }
            }' "$f")
        [[ -n $m ]] && echo "$m" && return
    done
    # deb822 format (*.sources): stanzas of Types/URIs/Suites/Enabled fields.
    for f in "$APT_ETC"/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        m=$(awk -v suite="$DEBIAN_SUITE" '
            function flush() {
                if (found) return
                if (types ~ / deb( |$)/ && suites ~ (" " suite "( |$)") && enabled != "no" &&
                    split(uris, u, " ") > 0 && u[1] ~ /^(https?|file):/) {
                    print u[1]
                    found = 1
                    exit
                }
                types = suites = uris = key = ""; enabled = "yes"
            }
            BEGIN { enabled = "yes" }
            /^[ \t]*$/ { flush(); next }
            /^#/ { next }
            /^[ \t]/ {
                if (key == "types") types = types " " $0
                else if (key == "suites") suites = suites " " $0
                else if (key == "uris") uris = uris " " $0
                next
            }
            {
                key = tolower(substr($0, 1, index($0, ":") - 1))
                v = substr($0, index($0, ":") + 1)
                if (key == "types") types = " " v
                else if (key == "suites") suites = " " v
                else if (key == "uris") uris = v
                else if (key == "enabled") { enabled = tolower(v); gsub(/[ \t]/, "", enabled) }
            }
            END { flush() }' "$f")
        [[ -n $m ]] && echo "$m" && return
    done
    return 0
}

debian_mirror() {
    if [[ -n $DEBIAN_MIRROR ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local m
    m=$(apt_mirror)
    if [[ -z $m ]]; then
        log "no Debian mirror for '$DEBIAN_SUITE' in apt's sources ($APT_ETC/sources.list," \
            "$APT_ETC/sources.list.d/*.list, *.sources); set DEBIAN_MIRROR to the URL of a" \
            "Debian archive that debootstrap can use" >&2
        return 1
    fi
    echo "$m"
}

if [[ ${1:-} == --print-mirror ]]; then
    debian_mirror
    exit
fi
: >"$TIMINGS"
step() { # step NAME FUNCTION: run and time it
    local t0=$SECONDS
    log "== $1"
    "$2"
    local dt=$((SECONDS - t0))
    log "== $1 done in ${dt} s"
    echo "$1 $dt" >>"$TIMINGS"
}

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO=sudo

install_engine() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 ||
        missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]} == 0)); then
        log "docker engine, compose and debootstrap already installed"
        return
    fi
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

storage_driver() {
    # overlay2 needs a real filesystem under /var/lib/docker (not overlayfs itself); vfs always
    # works but copies every layer and every container's rootfs in full (slow, disk-hungry).
    if [[ -n ${DOCKER_STORAGE_DRIVER:-} ]]; then
        echo "$DOCKER_STORAGE_DRIVER"
        return
    fi
    local fs
    fs=$(stat -f -c %T /var/lib 2>/dev/null || echo unknown)
    if grep -qw overlay /proc/filesystems && [[ $fs == ext2/ext3 || $fs == xfs ]]; then
        echo overlay2
    else
        echo vfs
    fi
}

wait_engine() { # wait_engine SECONDS
    local deadline=$((SECONDS + $1))
    while ((SECONDS < deadline)); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    return 1
}

start_daemon() {
    if docker info >/dev/null 2>&1; then
        log "a Docker engine is reachable: $(docker info --format '{{.ServerVersion}} ({{.Driver}})')"
        return
    fi
    local driver
    driver=$(storage_driver)
    log "starting dockerd --storage-driver=$driver (log: $DOCKERD_LOG)"
    # setsid: the daemon outlives this script and CI's process group; it is meant to.
    $SUDO setsid dockerd --storage-driver="$driver" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local pid=$!
    if ! wait_engine 60; then
        if [[ $driver != vfs && -z ${DOCKER_STORAGE_DRIVER:-} ]]; then
            log "dockerd with $driver did not come up; retrying with vfs"
            $SUDO kill "$pid" 2>/dev/null || true
            sleep 3
            $SUDO setsid dockerd --storage-driver=vfs >>"$DOCKERD_LOG" 2>&1 </dev/null &
            wait_engine 60 && return
        fi
        tail -n 30 "$DOCKERD_LOG" >&2
        log "dockerd did not become reachable in time"
        exit 1
    fi
    log "engine up: $(docker info --format '{{.ServerVersion}} ({{.Driver}})')"
}

build_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE exists"
        return
    fi
    if docker image inspect python:3.11-slim >/dev/null 2>&1; then
        log "python:3.11-slim is present; tagging it as $BASE_IMAGE"
        docker tag python:3.11-slim "$BASE_IMAGE"
        return
    fi
    local rootfs
    rootfs=$(mktemp -d /var/tmp/fedunroll-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "$SUDO rm -rf '$rootfs'" RETURN
    local mirror
    mirror=$(debian_mirror) || exit 1
    log "debootstrap $DEBIAN_SUITE (minbase + python3) from $mirror"
    $SUDO debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates,openssl \
        "$DEBIAN_SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
        {
            tail -n 30 "$rootfs.log" >&2
            exit 1
        }
    # Slim it: apt lists, docs, man pages and locales are not needed at run time.
    $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    $SUDO tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -f "$rootfs.log"
    log "imported $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec))"
}

build_wheelhouse() {
    # Pins: the tested venv's versions (`pip freeze` as constraints), so the image runs exactly
    # what `make test` ran; only the project's own dependency tree is collected (no dev tools).
    # The project itself is not in the wheelhouse (the Dockerfile installs it from source in a
    # later layer), so a code change does not invalidate the dependency layer.
    local pip=$VENV/bin/pip
    [[ -x $pip ]] || {
        log "no venv at $VENV (run make install first)"
        exit 1
    }
    mkdir -p "$WHEELHOUSE"
    local pins=$WHEELHOUSE/venv-freeze.txt
    "$pip" freeze --exclude-editable >"$pins.new"
    if [[ -f $pins && -f $WHEELHOUSE/.complete ]] && cmp -s "$pins" "$pins.new" &&
        cmp -s "$ROOT/pyproject.toml" "$WHEELHOUSE/pyproject.toml"; then
        rm -f "$pins.new"
        log "wheelhouse up to date ($(du -sh "$WHEELHOUSE" | cut -f1))"
        return
    fi
    mv "$pins.new" "$pins"
    rm -f "$WHEELHOUSE/.complete"
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    "$pip" wheel -q --no-deps -w "$tmp" "$ROOT"
    # `pip wheel` downloads binary wheels and builds the few sdists, so the image build needs
    # neither a compiler nor the network. Host python = image python (3.11, x86_64 glibc).
    # setuptools (pyproject's build requirement): to build the project from source offline
    # (--no-build-isolation).
    "$pip" wheel -q -w "$WHEELHOUSE" -c "$pins" "$(ls "$tmp"/fedunroll-*.whl)" \
        "setuptools>=77"
    rm -f "$WHEELHOUSE"/fedunroll-*.whl
    cp "$ROOT/constraints.txt" "$ROOT/pyproject.toml" "$WHEELHOUSE/"
    # name==version of every wheel: what the image installs, offline.
    (cd "$WHEELHOUSE" && ls -1 ./*.whl | sed -E 's|^\./||; s|^([^-]+)-([^-]+)-.*|\1==\2|' |
        sort >requirements.lock)
    touch "$WHEELHOUSE/.complete"
    log "wheelhouse: $(wc -l <"$WHEELHOUSE/requirements.lock") wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

build_image() {
    local ctx
    ctx=$(mktemp -d /var/tmp/fedunroll-ctx.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$ctx'" RETURN
    # A clean context: only what the Dockerfile copies (never .venv, data, runs or secrets).
    "$ROOT/deploy/stage-context.sh" "$ctx" >/dev/null
    docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" -f "$ctx/deploy/Dockerfile" \
        "$ctx" >/dev/null
    log "image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"
}

step install-engine install_engine
step start-daemon start_daemon
step base-image build_base
step wheelhouse build_wheelhouse
((BUILD)) && step image build_image
log "timings (s):"
sed 's/^/  /' "$TIMINGS"
