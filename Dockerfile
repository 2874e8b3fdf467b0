# syntax=docker/dockerfile:1
# convstate's container image. The build stage turns the project and every dependency into wheels (it has
# the compilers a dependency without a binary wheel would need); the runtime stage installs only those
# wheels, so it has no compiler, no pip in the service's environment and no build tree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
# The admin client: `convstate admin ...` inside the container uses it.
COPY clients/python ./clients/python
RUN pip wheel --no-cache-dir --wheel-dir /wheels . ./clients/python

FROM ${PYTHON_IMAGE} AS runtime
# The service writes nothing to its root filesystem: no bytecode at run time (it is compiled at install),
# logs go to stdout, HOME points at /tmp (the chart mounts an emptyDir there). The grace period is the
# service's drain time on SIGTERM; the orchestrator's stop timeout must exceed it (the chart adds a
# margin; with plain Docker use `docker stop --time 45`).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    PATH=/opt/convstate/bin:$PATH \
    CONVSTATE_HOST=0.0.0.0 \
    CONVSTATE_PORT=8000 \
    CONVSTATE_WORKERS=1 \
    CONVSTATE_SHUTDOWN_GRACE_SECONDS=30
# A named account for the numeric uid: some libraries look the user up (asyncpg's default user name).
RUN groupadd --system --gid 10001 convstate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin convstate
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/convstate \
 && pip --python /opt/convstate/bin/python install --no-cache-dir --no-index --find-links=/wheels convstate convstate-client
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# SIGTERM drains: new turns get 503 while those in flight finish (CONVSTATE_SHUTDOWN_GRACE_SECONDS).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ['CONVSTATE_PORT'], timeout=2)"]
ENTRYPOINT ["convstate", "serve"]
