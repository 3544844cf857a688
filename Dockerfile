# syntax=docker/dockerfile:1
# tdx-control-plane service image.
#
#   docker build -t tdx-control-plane .
#   docker run -d -p 8080:8080 -v tdx-data:/data tdx-control-plane     # SQLite in /data
#   docker logs <container>                                            # the admin token, at first start
#   docker run ... -e TDX_DATABASE_URL=postgresql+psycopg://user:pw@db:5432/tdx tdx-control-plane
#
# Built only from the repository's own files (see .dockerignore).

# ---- builder: a wheel of the project, installed with its dependencies into /opt/venv ----------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations

RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --upgrade pip \
 && /opt/venv/bin/pip wheel --quiet --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --quiet "$(ls /wheels/*.whl)[server]"

# The wheel carries migrations/ as service/migrations; prove the installed image can migrate.
RUN cd /tmp \
 && TDX_DATABASE_URL=sqlite:////tmp/smoke.db TDX_ADMIN_TOKEN=build-smoke-token-of-at-least-32-characters /opt/venv/bin/tdx-service migrate \
 && rm -f /tmp/smoke.db*

# ---- final: the interpreter and the venv, nothing else ---------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TDX_DATABASE_URL=sqlite:////data/tdx.db

RUN groupadd --system --gid 10001 tdx \
 && useradd --system --uid 10001 --gid tdx --home-dir /data --no-create-home --shell /usr/sbin/nologin tdx \
 && mkdir -p /data \
 && chown tdx:tdx /data

COPY --from=builder /opt/venv /opt/venv

USER tdx
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]

CMD ["tdx-service", "serve", "--host", "0.0.0.0", "--port", "8080"]
