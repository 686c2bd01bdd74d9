# pgproxy container image.
#   Build:  docker build -t pgproxy .
#   Run:    docker run -p 6432:6432 -p 9433:9433 \
#             -v $PWD/pgproxy.toml:/etc/pgproxy/pgproxy.toml:ro pgproxy
#   or with the environment only:
#           docker run -p 6432:6432 -e PGPROXY_POOL_MODE=transaction \
#             -e PGPROXY_DATABASES='{"app": {"host": "db", "user": "app"}}' pgproxy
# Stop with SIGTERM (the runtime's default stop): pgproxy stops accepting and exits once
# its clients have left; give it a stop timeout long enough for them (docker stop -t 60).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# -- build: a virtualenv with the pinned runtime packages and pgproxy -----------------------
FROM ${PYTHON_IMAGE} AS build
# A C compiler for mypyc, which compiles pgproxy's hot modules (setup.py); only this stage
# has it. Debian's security updates replace these versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY deploy/container/requirements.lock ./
RUN python -m venv /opt/pgproxy \
    && /opt/pgproxy/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r requirements.lock
COPY pyproject.toml setup.py README.md ./
COPY pgproxy ./pgproxy
# Compiled (`pgproxy --version` says so); --build-arg PURE_PGPROXY=1 for pure Python.
ARG PURE_PGPROXY=0
RUN PURE_PGPROXY=${PURE_PGPROXY} /opt/pgproxy/bin/pip install --no-cache-dir \
        --disable-pip-version-check --no-deps . \
    && /opt/pgproxy/bin/pgproxy --version

# -- final: the virtualenv and the entrypoint, no compiler, no pip cache ---------------------
FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgproxy
COPY --from=build /opt/pgproxy /opt/pgproxy
COPY deploy/container/entrypoint.sh /usr/local/bin/pgproxy-entrypoint
# (No PGPROXY_* here: they would override a mounted config file. The entrypoint listens on
# every address only when the environment alone configures pgproxy.)
ENV PATH=/opt/pgproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
USER 10001
# The proxy, and /metrics, /healthz, /readyz.
EXPOSE 6432 9433
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9433/healthz', timeout=2)"]
ENTRYPOINT ["pgproxy-entrypoint"]
