"""Choosing a rule backend from `--rules`, and `uproxy --cleanup`."""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from uproxy.rules import privilege
from uproxy.rules.base import NoRules, Rules, RulesError
from uproxy.rules.iptables import IptablesRules
from uproxy.rules.nft import NftRules

KINDS = ("auto", "iptables", "nft", "iptc", "none")


def make_rules(kind: str, chain_prefix: str, *, laptop_mode: bool,
               render_only: bool = False) -> Rules:
    """The backend for `--rules KIND`; ValueError/RulesError in one line when unusable.

    `auto` is `none` in laptop mode (`--bind-range`: clients reach listeners
    directly) and `iptables` otherwise, which works on both iptables variants.
    `render_only` (`uproxy explain`): a backend that is only asked to render,
    made without looking at the host or opening anything.
    """
    if kind == "auto":
        kind = "none" if laptop_mode else "iptables"
    if kind == "none":
        return NoRules()
    if kind == "iptables":
        return IptablesRules(chain_prefix)
    if kind == "nft":
        return NftRules(chain_prefix, in_process=False if render_only else None)
    if kind == "iptc":
        from uproxy.rules.iptc import IptcRules

        return IptcRules(chain_prefix, check_host=not render_only)
    raise ValueError(f"--rules {kind!r}: choose one of {', '.join(KINDS)}")


async def cleanup_all(chain_prefix: str, kinds: Sequence[str] = ()) -> list[str]:
    """Remove every chain, table and jump uproxy made with this prefix.

    With no kinds, every backend: the host's iptables, legacy xtables (where
    the iptc backend writes, when the host's iptables is the nft variant)
    and nft. Tools that are not installed are skipped. Returns what was
    removed, one line each; nothing to remove is not an error.
    """
    wanted = [k for k in kinds if k not in ("auto", "none")] or ["iptables", "iptc", "nft"]
    privilege.check_rules_privilege("--cleanup", runs_tools=True, takes_xtables_lock=False)
    backends: list[IptablesRules | NftRules] = []
    if "iptables" in wanted and shutil.which("iptables-restore"):
        backends.append(IptablesRules(chain_prefix))
    if "iptc" in wanted and shutil.which("iptables-legacy-restore"):
        backends.append(IptablesRules(chain_prefix, legacy=True))
    elif "iptc" in wanted and "iptables" not in wanted and shutil.which("iptables-restore"):
        backends.append(IptablesRules(chain_prefix))  # a legacy-only host
    if "nft" in wanted and shutil.which("nft"):
        backends.append(NftRules(chain_prefix))
    for kind in wanted:
        if kind not in KINDS:
            raise ValueError(f"--rules {kind!r}: choose one of {', '.join(KINDS)}")
    removed: list[str] = []
    errors: list[str] = []
    for backend in backends:
        try:
            removed += await backend.remove_all()
        except RulesError as error:
            errors.append(str(error))
    if errors:
        raise RulesError("; ".join(errors))
    return removed
