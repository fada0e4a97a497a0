# Meshline images:
#   control plane: `docker build -t meshline:0.1.0 .`
#   sidecar proxy: `docker build --target proxy -t meshline-proxy:0.1.0 .` (meshline + envoy +
#   iptables, used by the injected init and sidecar containers)
# Runs as the non-root user 10001 (matching manifests/deployment.yaml) and works with a
# read-only root filesystem (bytecode is compiled at build time; /tmp is a volume).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY protos ./protos
COPY controlplane ./controlplane
COPY webhook ./webhook
RUN python -m venv /opt/meshline \
 && /opt/meshline/bin/pip install --upgrade pip \
 && /opt/meshline/bin/pip install . \
 && /opt/meshline/bin/python -m compileall -q /opt/meshline
RUN python -m venv /opt/meshline-proxy \
 && /opt/meshline-proxy/bin/pip install --upgrade pip \
 && /opt/meshline-proxy/bin/pip install '.[proxy]' \
 && /opt/meshline-proxy/bin/python -m compileall -q /opt/meshline-proxy

FROM python:3.11-slim AS proxy
ENV PATH=/opt/meshline/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 meshline-proxy \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin meshline-proxy
COPY --from=build /opt/meshline-proxy /opt/meshline
USER 1337:1337
EXPOSE 15001 15006 15008 15021 15090
ENTRYPOINT ["meshline"]

FROM python:3.11-slim AS controlplane
ENV PATH=/opt/meshline/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 meshline \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin meshline
COPY --from=build /opt/meshline /opt/meshline
USER 10001:10001
# 15012 xDS + CA over TLS (15010, plaintext xDS, stays on loopback), 15014 status and /metrics,
# 15017 webhooks (HTTPS)
EXPOSE 15012 15014 15017
ENTRYPOINT ["meshline"]
CMD ["serve", "--kubernetes", "--xds-address", "127.0.0.1:15010", "--status-address", "0.0.0.0:15014", "--status-token-file", "/var/run/secrets/meshline/status/token", "--webhook-address", "0.0.0.0:15017", "--ca-address", "0.0.0.0:15012"]
