# Shared helpers for the make targets. Sourced, not run.
say() { printf '[vfed] %s\n' "$*"; }
die() { printf '[vfed] error: %s\n' "$*" >&2; exit 1; }

# run_logged DESC CMD...: run a command; on failure print the command and the tail of its output.
run_logged() {
    local desc=$1; shift
    local log; log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        printf '[vfed] error: %s failed: %s\n' "$desc" "$*" >&2
        tail -n 20 "$log" | sed 's/^/    /' >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
}

is_root() { [ "$(id -u)" = 0 ]; }

APT_UPDATED=""
apt_install() {
    # apt_install PKG...: install Debian packages, as root only.
    is_root || die "need root to install: $* (run: sudo apt-get install -y $*)"
    command -v apt-get >/dev/null || die "no apt-get on this machine; install by hand: $*"
    if [ -z "$APT_UPDATED" ]; then
        run_logged "apt-get update" apt-get update -q
        APT_UPDATED=1
    fi
    say "installing with apt: $*"
    DEBIAN_FRONTEND=noninteractive run_logged "apt-get install" apt-get install -y -q --no-install-recommends "$@"
}
