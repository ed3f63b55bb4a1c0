#!/usr/bin/env bash
# Builds each example algorithm as vfed-examples/<name>:latest from vfed/algorithm-base (make images first).
# An image is rebuilt only when its inputs changed (label vfed.inputs: the base image id plus a hash of the
# example's folder). The build is `vfed algorithm build`: it stores the module's manifest (label
# vfed.manifest, where the node reads which methods spend privacy budget) and the versions the image's SDK
# speaks (label vfed.sdk), both read from the built image itself.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../../scripts/lib.sh
. "$root/scripts/lib.sh"

BASE=vfed/algorithm-base
PY=${PY:-$root/.venv/bin/python}  # a Python with this vfed installed (`make images` passes the venv's)
[ -x "$PY" ] || PY=python3

inputs_hash() {  # inputs_hash DIR: a hash of the folder's files
    find "$1" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z \
        | xargs -0 sha256sum | sed "s#  $1/#  #" | sha256sum | cut -c1-16
}

build_example() {
    local dir=$1 name; name=$(basename "$dir")
    local image=vfed-examples/$name:latest base_id hash
    base_id=$(docker image inspect --format '{{.Id}}' "$BASE")
    hash=$(printf '%s-%s' "$base_id" "$(inputs_hash "$dir")" | sha256sum | cut -c1-16)
    if [ "$(docker image inspect --format '{{ index .Config.Labels "vfed.inputs" }}' "$image" 2>/dev/null)" = "$hash" ]; then
        say "image $image: reused (inputs unchanged)"
        return
    fi
    say "image $image: building"
    run_logged "vfed algorithm build $name" \
        "$PY" -m vfed.client.cli algorithm build "$dir" --tag "$image" --label "vfed.inputs=$hash"
}

main() {
    command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1 \
        || die "no Docker engine answers (run: make infra)"
    docker image inspect "$BASE" >/dev/null 2>&1 || die "no $BASE image (run: make images)"
    local only=("$@")
    for dir in "$here"/*/; do
        dir=${dir%/}
        [ -f "$dir/Dockerfile" ] || continue
        if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " =~ " $(basename "$dir") " ]]; then
            continue
        fi
        build_example "$dir"
    done
}
main "$@"
