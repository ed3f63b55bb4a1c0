# vfed/node: the node agent. `vnode start` runs it with the Docker socket, config, key and datasets mounted.
FROM vfed/base
VOLUME ["/var/lib/vfed"]
ENTRYPOINT ["vnode"]
CMD ["run", "--config", "/etc/vfed/node.yaml"]
