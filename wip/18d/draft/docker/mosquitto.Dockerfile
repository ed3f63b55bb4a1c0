# vfed/mosquitto: Mosquitto 2 from Debian bookworm, for sites (and tests) without an image registry. The layout
# is the official `eclipse-mosquitto` image's (/mosquitto/config, /mosquitto/data, /mosquitto/log), so
# docker/compose.yaml mounts `vserver broker config`'s files the same way into either image. The Debian root
# file system comes from debootstrap (scripts/build-images.sh), like the Python base.
ARG MOSQUITTO_ROOTFS=vfed/debian-mosquitto:bookworm
FROM ${MOSQUITTO_ROOTFS}
RUN mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log \
 && printf 'listener 1883\nallow_anonymous false\npersistence true\npersistence_location /mosquitto/data/\n' \
      >/mosquitto/config/mosquitto.conf \
 && chown -R mosquitto:mosquitto /mosquitto
VOLUME ["/mosquitto/data"]
EXPOSE 1883 8883
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=5 \
  CMD nc -z 127.0.0.1 8883 || nc -z 127.0.0.1 1883
ENTRYPOINT []
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
