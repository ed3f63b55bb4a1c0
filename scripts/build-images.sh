#!/usr/bin/env bash
# Builds the vfed images: vfed/base, vfed/node, vfed/server, vfed/algorithm-base (+ the test images).
# Each image is labelled with a hash of its inputs and rebuilt only when that hash changed.
#
# Air-gapped path (also what happens on machines without a registry):
#   1. a Python base image is built from Debian with debootstrap and `docker import` (when BASE_IMAGE cannot be
#      pulled and is not present);
#   2. every Python package is built as a wheel on the host into build/wheelhouse;
#   3. the Dockerfiles install only from that wheelhouse (pip --no-index --find-links).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
cd "$root"

PY=${PY:-$root/.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
LOCAL_BASE=vfed/debian-python:bookworm
CACHE=${VFED_CACHE:-$root/build}
WHEELHOUSE=$CACHE/wheelhouse
mkdir -p "$CACHE"

image_label() {  # image_label IMAGE -> the vfed.inputs label, or nothing
    docker image inspect --format '{{ index .Config.Labels "vfed.inputs" }}' "$1" 2>/dev/null || true
}

resolve_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image: $BASE_IMAGE (present)"; return
    fi
    if timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image: $BASE_IMAGE (pulled)"; return
    fi
    if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        say "base image: reused $LOCAL_BASE (no registry; built earlier with debootstrap)"
        BASE_IMAGE=$LOCAL_BASE; return
    fi
    say "no registry answers: building $LOCAL_BASE from Debian with debootstrap (about a minute)"
    command -v debootstrap >/dev/null || apt_install debootstrap
    local dir=$CACHE/rootfs
    rm -rf "$dir"
    run_logged "debootstrap" debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$dir"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
    ln -sf python3 "$dir/usr/bin/python" 2>/dev/null || true
    rm -rf "$dir"
    BASE_IMAGE=$LOCAL_BASE
    say "base image: built $LOCAL_BASE"
}

build_wheelhouse() {
    # The project wheel plus every dependency of the extras the images need, built on the host.
    local extras=".[algorithms,postgres,sql]"
    local stamp; stamp=$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -c1-16)
    if [ -f "$WHEELHOUSE/.deps-$stamp" ]; then
        say "wheelhouse: reused dependency wheels"
    else
        rm -rf "$WHEELHOUSE"; mkdir -p "$WHEELHOUSE"
        say "wheelhouse: building dependency wheels on the host"
        run_logged "pip wheel" "$PY" -m pip wheel -q -w "$WHEELHOUSE" "$extras"
        rm -f "$WHEELHOUSE"/vfed-*.whl
        touch "$WHEELHOUSE/.deps-$stamp"
    fi
    rm -f "$WHEELHOUSE"/vfed-*.whl
    run_logged "pip wheel vfed" "$PY" -m pip wheel -q --no-deps -w "$WHEELHOUSE" .
}

# inputs_hash FILE...: a hash of the given files and directories' contents (git-tracked or not).
inputs_hash() {
    find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 2>/dev/null | sort -z \
        | xargs -0 sha256sum | sha256sum | cut -c1-16
}

# build NAME DOCKERFILE CONTEXT HASH [build args...]
build() {
    local name=$1 dockerfile=$2 context=$3 hash=$4; shift 4
    if [ "$(image_label "$name")" = "$hash" ]; then
        say "image $name: reused (inputs unchanged)"
        return
    fi
    say "image $name: building"
    run_logged "docker build $name" docker build -q -f "$dockerfile" --label "vfed.inputs=$hash" \
        -t "$name" "$@" "$context"
}

# debootstrap_image IMAGE PACKAGES: a Debian bookworm root file system with these packages (comma-separated),
# imported as IMAGE; built only when IMAGE is missing (like the Python base). Package scripts run in the chroot
# cannot start services there (no init, runlevel unknown); the clusters/configs they made are dropped.
debootstrap_image() {
    local image=$1 packages=$2
    if docker image inspect "$image" >/dev/null 2>&1; then
        say "image $image: reused (built earlier with debootstrap)"; return
    fi
    say "image $image: building from Debian with debootstrap ($packages; about a minute)"
    command -v debootstrap >/dev/null || apt_install debootstrap
    local dir=$CACHE/rootfs-${image//[\/:]/-}
    rm -rf "$dir"
    run_logged "debootstrap $image" debootstrap --variant=minbase --include="$packages" bookworm "$dir"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
        "$dir"/var/lib/postgresql/15/main "$dir"/etc/postgresql/15/main
    tar -C "$dir" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$image" >/dev/null
    rm -rf "$dir"
}

# The compose file's database and broker for sites without a registry (docker/compose.yaml takes the official
# images by default): Debian's PostgreSQL 15 and Mosquitto on debootstrapped roots, plus an entrypoint/layout
# that reads the official images' variables and paths. Rebuilt when the root or docker/<name>* changes.
build_services() {
    local name rootfs packages hash
    for spec in "postgres vfed/debian-postgres:bookworm postgresql-15" \
                "mosquitto vfed/debian-mosquitto:bookworm mosquitto,netcat-openbsd"; do
        read -r name rootfs packages <<<"$spec"
        debootstrap_image "$rootfs" "$packages"
        hash=$(printf '%s-%s' "$(docker image inspect --format '{{.Id}}' "$rootfs")" \
            "$(inputs_hash docker/"$name"*)" | sha256sum | cut -c1-16)
        build "vfed/$name" "docker/$name.Dockerfile" docker "$hash"
    done
}

main() {
    command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1 \
        || die "no Docker engine answers (run: make infra)"
    resolve_base
    build_wheelhouse
    local ctx=$CACHE/context
    rm -rf "$ctx"; mkdir -p "$ctx"
    cp -a "$WHEELHOUSE" "$ctx/wheels"
    cp -a docker/. "$ctx/"
    local base_id; base_id=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE")
    local src; src=$(inputs_hash common node server proxy algorithms client pyproject.toml docker)
    local h="$base_id-$src"
    h=$(printf '%s' "$h" | sha256sum | cut -c1-16)
    build vfed/base "$ctx/base.Dockerfile" "$ctx" "$h" --build-arg "BASE_IMAGE=$BASE_IMAGE"
    build vfed/node "$ctx/node.Dockerfile" "$ctx" "$h"
    build vfed/server "$ctx/server.Dockerfile" "$ctx" "$h"
    build vfed/algorithm-base "$ctx/algorithm-base.Dockerfile" "$ctx" "$h"
    build_services
    if [ -d tests/images ]; then
        "$PY" -m tests.imagebuild || die "building the test images failed"
    fi
    rm -rf "$ctx"
}
main "$@"
