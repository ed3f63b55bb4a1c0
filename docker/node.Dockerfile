# vfed/node: the node agent. `vnode start` runs it with the Docker socket, config, key and datasets mounted.
# VFED_BASE: the vfed/base image to start from (`vnode image build` names its own)
ARG VFED_BASE=vfed/base
FROM ${VFED_BASE}
VOLUME ["/var/lib/vfed"]
ENTRYPOINT ["vnode"]
CMD ["run", "--config", "/etc/vfed/node.yaml"]
