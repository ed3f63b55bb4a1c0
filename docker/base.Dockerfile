# vfed/base: Python plus the vfed wheel and its dependencies, installed only from a local wheelhouse
# (pip --no-index --find-links), so the same file builds on air-gapped sites.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/vfed \
 && /opt/vfed/bin/pip install -q --no-index --find-links /tmp/wheels vfed \
 && rm -rf /tmp/wheels /root/.cache \
 && (getent group vfed >/dev/null || groupadd --system --gid 10001 vfed) \
 && (getent passwd vfed >/dev/null || useradd --system --uid 10001 --gid vfed --home-dir /home/vfed --create-home vfed)
ENV PATH=/opt/vfed/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
