# vfed/algorithm-base: the algorithm SDK plus pandas/pyarrow. Algorithm images start FROM this one and run
# as the unprivileged user; the node adds the rest of the hardening at `docker run`.
# VFED_BASE: the vfed/base image to start from (`vnode image build` names its own)
ARG VFED_BASE=vfed/base
FROM ${VFED_BASE}
COPY wheels /tmp/wheels
RUN /opt/vfed/bin/pip install -q --no-index --find-links /tmp/wheels "vfed[algorithms,postgres]" \
 && rm -rf /tmp/wheels /root/.cache
USER 10001:10001
WORKDIR /home/vfed
ENTRYPOINT ["python3", "-m", "vfed.algorithms"]
