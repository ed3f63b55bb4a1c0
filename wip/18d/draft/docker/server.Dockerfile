# vfed/server: the central server. Its state (SQLite unless database_url names PostgreSQL, blobs, the JWT secret
# it keeps when none is configured) is the volume /home/vfed/data; the HEALTHCHECK asks GET /api/v1/health on
# the container's own port, over HTTP or HTTPS (docker/healthcheck.py). The postgres extra (asyncpg) is in:
# docker/compose.yaml runs it on PostgreSQL.
FROM vfed/base
COPY wheels /tmp/wheels
COPY healthcheck.py /opt/vfed/healthcheck.py
RUN /opt/vfed/bin/pip install -q --no-index --find-links /tmp/wheels "vfed[postgres]" \
 && rm -rf /tmp/wheels /root/.cache \
 && mkdir -p /home/vfed/data && chown vfed:vfed /home/vfed/data && chmod 0700 /home/vfed/data
USER vfed
VOLUME ["/home/vfed/data"]
EXPOSE 7600
HEALTHCHECK --interval=10s --timeout=12s --start-period=60s --retries=3 CMD ["python3", "/opt/vfed/healthcheck.py"]
ENTRYPOINT ["vserver"]
CMD ["start", "--host", "0.0.0.0", "--data-dir", "/home/vfed/data"]
