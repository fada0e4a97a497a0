# Meshline control-plane image: `docker build -t meshline:0.1.0 .`
# Runs as the non-root user 10001 (matching manifests/deployment.yaml) and works with a
# read-only root filesystem (bytecode is compiled at build time; /tmp is a volume).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controlplane ./controlplane
COPY webhook ./webhook
RUN python -m venv /opt/meshline \
 && /opt/meshline/bin/pip install --upgrade pip \
 && /opt/meshline/bin/pip install . \
 && /opt/meshline/bin/python -m compileall -q /opt/meshline

FROM python:3.11-slim
ENV PATH=/opt/meshline/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 meshline \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin meshline
COPY --from=build /opt/meshline /opt/meshline
USER 10001:10001
# 15010 xDS, 15012 xDS + CA over mTLS, 15014 status and /metrics, 15017 webhooks (HTTPS)
EXPOSE 15010 15012 15014 15017
ENTRYPOINT ["meshline"]
CMD ["serve", "--kubernetes", "--xds-address", "0.0.0.0:15010", "--status-address", "0.0.0.0:15014", "--webhook-address", "0.0.0.0:15017"]
