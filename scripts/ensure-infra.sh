#!/usr/bin/env bash
# Makes sure the real components the tests need are here: a Docker engine that answers, the Mosquitto,
# PostgreSQL, debootstrap and docker-registry binaries, and moto's S3 server. The test session starts its own broker, database
# and S3 server on loopback.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/vfed-dockerd.log}

docker_answers() { timeout 10 docker info >/dev/null 2>&1; }

ensure_docker() {
    if command -v docker >/dev/null && docker_answers; then
        say "docker engine: answering ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
        return
    fi
    if ! is_root; then
        die "no Docker engine answers and this is not root: install and start one (apt-get install docker.io), or run as root"
    fi
    if ! command -v dockerd >/dev/null; then
        apt_install docker.io iptables
    fi
    command -v docker >/dev/null || die "docker client missing after installing docker.io"
    say "starting dockerd in the background (log: $DOCKERD_LOG)"
    nohup dockerd >>"$DOCKERD_LOG" 2>&1 &
    for _ in $(seq 1 60); do
        if docker_answers; then
            say "docker engine: started"
            return
        fi
        sleep 1
    done
    tail -n 20 "$DOCKERD_LOG" | sed 's/^/    /' >&2
    die "dockerd did not answer within 60 s (log above: $DOCKERD_LOG)"
}

ensure_binaries() {
    local missing=()
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
    command -v docker-compose >/dev/null || missing+=(docker-compose)  # validates docker/compose.yaml
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)  # TLS-proxy tests
    [ -x /usr/bin/docker-registry ] || missing+=(docker-registry)  # OCI distribution API tests
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    # The distribution's own service instances are not used; the tests start their own on free ports.
    say "mosquitto, postgresql, debootstrap, haproxy, docker-registry: present"
}

# moto's S3 server for the S3 blob store tests, in a venv of its own: moto needs botocore, which caps
# python-dateutil below 3, while the kubernetes client of the project's venv needs 3 or later.
ensure_moto() {
    local venv=${MOTO_VENV:-.venv-moto}
    if [ -x "$venv/bin/moto_server" ]; then
        say "moto_server: present ($venv)"
        return
    fi
    command -v python3 >/dev/null || die "no python3 on PATH for the moto venv"
    run_logged "python -m venv (moto)" python3 -m venv "$venv"
    run_logged "pip install moto[server]" "$venv/bin/pip" install -q 'moto[server]>=5.1,<6'
    say "moto_server: installed into $venv"
}

ensure_binaries
ensure_moto
ensure_docker
