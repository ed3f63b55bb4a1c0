#!/bin/bash
# The entrypoint of vfed/postgres: on an empty data folder, initdb with the superuser POSTGRES_USER whose
# password comes from POSTGRES_PASSWORD_FILE (a mounted secret; POSTGRES_PASSWORD is accepted too, as the
# official image does), create POSTGRES_DB, and allow password (scram-sha-256) logins from the network; then run
# the server as the postgres user. Unlike the official image it runs no /docker-entrypoint-initdb.d scripts.
set -euo pipefail
export PGDATA=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
[ "$#" -gt 0 ] && shift

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /run/postgresql
    chown postgres:postgres "$PGDATA" /run/postgresql
    chmod 0700 "$PGDATA"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        [ -r "$POSTGRES_PASSWORD_FILE" ] || { echo "vfed-postgres: cannot read $POSTGRES_PASSWORD_FILE" >&2; exit 1; }
        password=$(cat "$POSTGRES_PASSWORD_FILE")
    else
        password=${POSTGRES_PASSWORD:-}
    fi
    if [ -z "$password" ]; then
        echo "vfed-postgres: set POSTGRES_PASSWORD_FILE (a mounted secret) to the superuser's password" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$password" >"$pwfile"
    chown postgres:postgres "$pwfile"
    as_postgres initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    printf '\n# vfed-postgres: password logins from the container network\nhost all all all scram-sha-256\n' \
        >>"$PGDATA/pg_hba.conf"
    if [ "$database" != postgres ]; then
        printf 'CREATE DATABASE "%s" OWNER "%s";\n' "$database" "$user" \
            | as_postgres postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "vfed-postgres: initialized $PGDATA (user $user, database $database)"
fi

if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -c listen_addresses='*' "$@"
fi
exec postgres -c listen_addresses='*' "$@"
