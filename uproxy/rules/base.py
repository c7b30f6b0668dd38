"""The `Rules` seam: what the proxier asks of a rule backend.

A backend is given the complete desired set of portals on every sync and
makes the kernel hold exactly that (idempotent; a full pass repairs anything
someone else changed). Rendering is pure (`rules.render`); only `apply` and
`cleanup` touch the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from uproxy.model import Frontend


@dataclass(frozen=True, slots=True)
class Portal:
    """A service port's frontend and the listener its traffic must reach."""

    frontend: Frontend
    proxy_ip: str  # the listener's bind address: "0.0.0.0"/"::" or one IP
    proxy_port: int


@dataclass(frozen=True, slots=True)
class PortalDelta:
    """How a portal list differs from the list of the previous apply call.

    `gone` are portals (the very objects) that were in the previous list and
    are not in this one, `new` the reverse; a port whose listener moved is
    in both. A backend that trusts its previous apply may work from this
    instead of walking every portal.
    """

    gone: tuple[Portal, ...] = ()
    new: tuple[Portal, ...] = ()

    @property
    def empty(self) -> bool:
        """The very portals of the previous call (only endpoints changed, say)."""
        return not self.gone and not self.new


class RulesError(Exception):
    """Applying rules failed; the previously applied rules are still in place."""


class Rules(Protocol):
    name: str

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        """Make the kernel hold exactly these portals. Raises RulesError.

        verify=True (the periodic full pass, when nothing else changed): read
        what the kernel really holds and repair every difference. verify=False
        (a sync that carries changes): the backend may trust what it applied
        last and send only the difference, as long as it keeps the kernel
        exact when nobody else touched it. `delta`, when given, is exactly
        how `portals` differs from the previous call's list (whether that
        call succeeded or not); a backend may use it or ignore it.
        """

    async def cleanup(self) -> None:
        """Remove every chain, table and jump this backend made."""

    async def preflight(self) -> list[str]:
        """Check once, before anything listens, that this backend can work on
        this host with this process's privileges. Raises RulesError in one
        line naming what is missing (e.g. CAP_NET_ADMIN); returns warnings
        about the host, one line each (e.g. a firewall that will drop what
        the rules redirect)."""

    def render(self, portals: Sequence[Portal]) -> str:
        """The exact text this backend would apply (for `uproxy explain`)."""


class NoRules:
    """Laptop mode and dry runs: listeners are reached directly."""

    name = "none"

    async def apply(self, portals: Sequence[Portal], *, verify: bool = True,
                    delta: PortalDelta | None = None) -> None:
        return None

    async def cleanup(self) -> None:
        return None

    async def preflight(self) -> list[str]:
        return []

    def render(self, portals: Sequence[Portal]) -> str:
        return "# --rules none: no kernel rules; clients connect to the listeners directly\n"
