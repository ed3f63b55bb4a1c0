# vfed/server: the central server.
FROM vfed/base
USER vfed
EXPOSE 7600
ENTRYPOINT ["vserver"]
CMD ["start", "--host", "0.0.0.0", "--data-dir", "/home/vfed/data"]
