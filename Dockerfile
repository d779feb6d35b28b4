# turnout as a container image. Nothing is pulled: the base is made locally by docker/build-base.sh
# (debootstrap bookworm -> `docker import` as turnout-base:bookworm); docker/build-image.sh runs both.
#
#   docker run --network host -v $PWD/routes:/etc/turnout/routes:ro turnout:latest
#
# Listeners: proxy 0.0.0.0:8080, admin API 127.0.0.1:8081 (loopback on purpose: it changes routing).
ARG BASE=turnout-base:bookworm

FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Optional CA bundle for TLS-intercepting networks (see docker/build-context/README.md).
COPY docker/build-context/ /tmp/build-context/
# setup.py compiles the data plane's per-request modules with mypyc (hence gcc and python3-dev here; the
# runtime stage needs neither).
COPY pyproject.toml setup.py README.md* /src/
COPY proxy/ /src/proxy/
RUN if [ -s /tmp/build-context/ca-certificates.crt ]; then export PIP_CERT=/tmp/build-context/ca-certificates.crt; fi \
 && python3 -m venv /opt/turnout \
 && /opt/turnout/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/turnout/bin/turnout --version

FROM ${BASE}
# Only the interpreter: the venv from the build stage brings every Python dependency.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/turnout --create-home --shell /usr/sbin/nologin turnout \
 && mkdir -p /etc/turnout/routes
COPY --from=build /opt/turnout /opt/turnout
COPY docker/routes.yaml /etc/turnout/routes/routes.yaml
COPY docker/healthcheck.py /opt/turnout/healthcheck.py
ENV PATH=/opt/turnout/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TURNOUT_STATE_DIR=/var/lib/turnout \
    TURNOUT_HEALTH_URL=http://127.0.0.1:8081/healthz
USER turnout
WORKDIR /var/lib/turnout
VOLUME ["/var/lib/turnout"]
EXPOSE 8080
# The admin API's /healthz answers without a token; the URL follows --admin through TURNOUT_HEALTH_URL.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/bin/python3", "/opt/turnout/healthcheck.py"]
ENTRYPOINT ["turnout"]
CMD ["serve", "--routes", "/etc/turnout/routes/routes.yaml", "--store", "sqlite:////var/lib/turnout/state.db", \
     "--listen", "0.0.0.0:8080", "--admin", "127.0.0.1:8081"]
