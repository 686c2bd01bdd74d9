# pgproxy container image. Build: docker build -t pgproxy .
# Run: docker run -p 6432:6432 -v $PWD/pgproxy.toml:/etc/pgproxy/pgproxy.toml:ro pgproxy
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgproxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pgproxy ./pgproxy
RUN pip install --no-cache-dir . && rm -rf /src

USER pgproxy
EXPOSE 6432
# Listen on every address inside the container; the config file may say otherwise.
ENV PGPROXY_LISTEN_ADDR="*"
ENTRYPOINT ["pgproxy"]
CMD ["-c", "/etc/pgproxy/pgproxy.toml"]
