# konnect-relay container image.
#
# Two stages so the image that runs has no compiler: the builder installs the
# project with the same `pip install .` as the README, into a prefix that the
# runtime stage copies over /usr/local.
#
#   docker build -t konnect-relay .
#   docker run --rm -p 3128:3128 -p 9464:9464 konnect-relay
#
# The default command runs config/container.yaml (listens on 0.0.0.0); mount
# your own file over /etc/konnect-relay/relay.yaml to pin control planes.

FROM python:3.11-slim AS builder

# Compilers only for dependencies without a wheel for this platform (uvloop,
# PyYAML and cryptography ship wheels for amd64/arm64, but not every arch).
# Versions are not pinned: Debian replaces superseded versions in its archive,
# so a pin breaks the build; the base image tag pins the release instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay/ relay/

# Same command as the README's install, with a prefix so the runtime stage can
# take exactly what it installed.
RUN pip install --no-cache-dir --prefix=/install .


FROM python:3.11-slim

LABEL org.opencontainers.image.title="konnect-relay" \
      org.opencontainers.image.description="HTTP CONNECT relay for Kong Gateway data planes that reach Kong Konnect" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid so Kubernetes' runAsNonRoot can verify it without
# looking up /etc/passwd, and so file ownership is the same on every host.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin relay

COPY --from=builder /install /usr/local
COPY config/container.yaml /etc/konnect-relay/relay.yaml

# The root filesystem is read-only in the Kubernetes manifests: never try to
# write bytecode caches; log lines leave the process as they are written.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001

# 3128: the CONNECT proxy Kong's proxy_server points at.
# 9464: admin (/metrics /healthz /readyz /tunnels).
EXPOSE 3128 9464

# The slim image has no curl; the interpreter is already here.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]

ENTRYPOINT ["konnect-relay"]
CMD ["run", "--config", "/etc/konnect-relay/relay.yaml"]
