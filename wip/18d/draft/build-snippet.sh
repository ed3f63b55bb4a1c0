
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
