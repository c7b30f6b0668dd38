# uproxy's container image. Two stages, so no compiler stays in the image.
#
#   docker build -t uproxy .        with a registry: the public Python base below
#   bash scripts/image.sh           without one: a Debian base is made on this host
#
# Rules mode needs NET_ADMIN and the host's network; laptop mode needs nothing:
#   docker run --network host --cap-drop ALL --cap-add NET_ADMIN uproxy --kubeconfig /kubeconfig
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Only for pip inside the build (a host whose TLS goes through its own CA
# mounts that bundle and names it here); not in the final image.
ARG PIP_CERT
# python-iptables builds a small C extension: a compiler, libc headers and,
# on a base whose Python has none, Python's headers.
# (DL3008, apt versions unpinned: as in the image's stage below.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && if [ ! -e "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; \
    then apt-get install -y --no-install-recommends python3-dev; fi \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY uproxy ./uproxy
# pip and setuptools install uproxy; the image does not need them after.
RUN python3 -m venv /opt/uproxy \
 && /opt/uproxy/bin/pip install --no-cache-dir . \
 && /opt/uproxy/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE}
# Both iptables variants (iptables is the nf_tables one, iptables-legacy the
# other), nftables with libnftables for the in-process nft backend, conntrack
# and iproute2 for looking around a node.
# (DL3008, apt versions unpinned: Debian stable's point and security releases
# replace exact versions, and an image pinned to a version that is gone cannot
# build; the base image fixes the release.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables conntrack iproute2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old
COPY --from=build /opt/uproxy /opt/uproxy
# Compiled at install; the root filesystem may be read-only.
ENV PATH=/opt/uproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["uproxy"]
CMD ["--help"]
