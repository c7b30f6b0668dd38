# uproxy on a node: rules mode needs NET_ADMIN (and host networking);
# laptop mode needs nothing special.
#   docker run --net=host --cap-add=NET_ADMIN uproxy --kubeconfig /kubeconfig
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables conntrack iproute2 gcc \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY uproxy ./uproxy
RUN pip install --no-cache-dir . && apt-get purge -y gcc && apt-get autoremove -y
ENTRYPOINT ["uproxy"]
