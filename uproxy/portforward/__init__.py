"""Reaching pods through the API server's port-forward (laptop mode, --dial).

`channels` is the wire protocol, sans-io; `dialer` opens one WebSocket per
connection with the kubeconfig's credentials; `connection` relays a client
through it, failing over as a direct dial does.
"""
