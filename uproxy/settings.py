"""Frozen, grouped settings, built once from the command line.

Code below the CLI reads these and never flags or the environment.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from uproxy.durations import PortRange

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
BindAddress = tuple[str, int]  # (IP, port); port 0: the OS picks one


@dataclass(frozen=True)
class SourceSettings:
    services_path: Path | None = None  # the file source; else Kubernetes
    kubeconfig: str | None = None
    master: str | None = None
    namespaces: tuple[str, ...] = ()  # Kubernetes namespaces to watch; () = all
    node_name: str = ""  # --hostname-override, for traffic policy Local
    hosts_file: Path | None = None  # laptop mode: write a hosts fragment here
    context: str | None = None  # --context: the kubeconfig context (None: its current one)
    # --service-proxy-name: serve only services labelled
    # service.kubernetes.io/service-proxy-name=NAME (None: only unlabelled ones)
    service_proxy_name: str | None = None

    @property
    def kind(self) -> str:
        return "file" if self.services_path is not None else "kube"


@dataclass(frozen=True)
class ListenerSettings:
    bind_address: str = "0.0.0.0"
    proxy_port_range: PortRange | None = None  # None: the OS picks
    bind_range: IPNetwork | None = None  # laptop mode
    udp_timeout: float = 30.0
    udp_max_sessions: int = 4096
    relay_mode: str = "auto"  # auto | splice | protocol
    workers: int = 1
    dial: str = "direct"  # direct | portforward | auto (resolved: never "default")

    @property
    def laptop_mode(self) -> bool:
        return self.bind_range is not None


@dataclass(frozen=True)
class RulesSettings:
    backend: str = "auto"  # auto | iptables | nft | iptc | none
    chain_prefix: str = "UPROXY"


@dataclass(frozen=True)
class SyncSettings:
    sync_period: float = 30.0
    min_sync_period: float = 1.0


@dataclass(frozen=True)
class WebSettings:
    healthz_bind: BindAddress | None = ("0.0.0.0", 10256)  # None: disabled
    metrics_bind: BindAddress | None = ("127.0.0.1", 10249)


@dataclass(frozen=True)
class LogSettings:
    format: str = "text"  # text | json
    verbose: int = 0


@dataclass(frozen=True)
class Settings:
    source: SourceSettings = field(default_factory=SourceSettings)
    listeners: ListenerSettings = field(default_factory=ListenerSettings)
    rules: RulesSettings = field(default_factory=RulesSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    web: WebSettings = field(default_factory=WebSettings)
    logs: LogSettings = field(default_factory=LogSettings)
    shutdown_grace: float = 10.0

    @property
    def rules_backend(self) -> str:
        """The backend after resolving 'auto': none in laptop mode, else iptables."""
        if self.rules.backend != "auto":
            return self.rules.backend
        return "none" if self.listeners.laptop_mode else "iptables"
