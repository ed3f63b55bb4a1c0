# vfed/postgres: PostgreSQL 15 from Debian bookworm, for sites (and tests) without an image registry. It takes
# the official `postgres` image's variables (POSTGRES_USER, POSTGRES_DB, POSTGRES_PASSWORD_FILE, PGDATA), so
# docker/compose.yaml runs either image unchanged. The Debian root file system comes from debootstrap
# (scripts/build-images.sh), like the Python base.
ARG POSTGRES_ROOTFS=vfed/debian-postgres:bookworm
FROM ${POSTGRES_ROOTFS}
COPY postgres-entrypoint.sh /usr/local/bin/vfed-postgres-entrypoint
RUN chmod 0755 /usr/local/bin/vfed-postgres-entrypoint \
 && mkdir -p /var/lib/postgresql/data /run/postgresql \
 && chown postgres:postgres /var/lib/postgresql/data /run/postgresql \
 && chmod 0700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=5 \
  CMD pg_isready -h 127.0.0.1 -U "${POSTGRES_USER:-postgres}" -d "${POSTGRES_DB:-${POSTGRES_USER:-postgres}}" -q
ENTRYPOINT ["vfed-postgres-entrypoint"]
CMD ["postgres"]
