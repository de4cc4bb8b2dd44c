# syntax=docker/dockerfile:1
#
# Session enricher image: `enricher run` by default; `enricher generate ...` and
# `enricher batch ...` work too (the entrypoint is the console script).
#
#   docker build -t session-enricher .
#   docker run --rm -e ENRICHER_BOOTSTRAP_SERVERS=... session-enricher           # enricher run
#   docker run --rm session-enricher generate --events 10 --devices 2          # JSON Lines out
#
# Configuration is ENRICHER_* environment variables only (see README.md); nothing is baked in.
# Written without a Docker engine at hand: tests/test_ops.py checks it statically.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: install the package and its dependencies into a virtualenv ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the wheel is built from (pyproject's readme is README.md); the .dockerignore keeps
# the context small anyway.
COPY pyproject.toml README.md ./
COPY enricher ./enricher
# confluent-kafka, fastavro and hiredis ship manylinux wheels (librdkafka included): no
# compiler needed.
RUN pip install . \
    && enricher --version

# --- runtime: the virtualenv only, as an unprivileged user ----------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="session-enricher" \
      org.opencontainers.image.description="Snowplow client_session entities, computed server-side, exactly once" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it (ops/k8s/deployment.yaml
# uses the same ids).
RUN groupadd --system --gid 10001 enricher \
    && useradd --system --uid 10001 --gid enricher --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin enricher
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001

# /metrics, /healthz, /readyz (ENRICHER_METRICS_PORT, default 9108).
EXPOSE 9108
# Liveness: the main loop is beating. The image has no curl, so Python's urllib does the GET;
# a non-2xx answer raises and exits non-zero. Only meaningful for `enricher run`: other
# commands (generate, batch) should disable it (docker-compose.yml does for the load generator).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ENRICHER_METRICS_PORT', '9108'), timeout=4)"]

# SIGTERM finishes or aborts the batch, commits, leaves the group and exits within
# ENRICHER_SHUTDOWN_TIMEOUT (20 s): give `docker stop` / compose more than that (-t 45).
STOPSIGNAL SIGTERM
ENTRYPOINT ["enricher"]
CMD ["run"]
