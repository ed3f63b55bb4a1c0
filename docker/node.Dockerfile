# vfed/node: the node agent. `vnode start` runs it with the Docker socket, config, key and datasets mounted.
# It extracts `sql` datasets itself (asyncpg, pyarrow: the `sql` extra), since algorithm containers have no network.
# VFED_BASE: the vfed/base image to start from (`vnode image build` names its own)
ARG VFED_BASE=vfed/base
FROM ${VFED_BASE}
COPY wheels /tmp/wheels
RUN /opt/vfed/bin/pip install -q --no-index --find-links /tmp/wheels "vfed[sql]" \
 && rm -rf /tmp/wheels /root/.cache
VOLUME ["/var/lib/vfed"]
ENTRYPOINT ["vnode"]
CMD ["run", "--config", "/etc/vfed/node.yaml"]
