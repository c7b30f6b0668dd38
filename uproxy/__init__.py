"""uproxy: a userspace TCP/UDP service proxy for Kubernetes-style services."""

__version__ = "0.1.0"
