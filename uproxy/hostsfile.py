"""A hosts-file fragment naming laptop-mode service IPs (`--hosts-file PATH`).

Each service gets one line: its IP, then `svc.ns`, `svc.ns.svc` and
`svc.ns.svc.<cluster domain>`. uproxy writes only between its own markers,
so pointing `--hosts-file` at a file that has other lines (even /etc/hosts,
which is never touched unless given) keeps them. Writes are atomic: a
temporary file in the same folder, then a rename; where the folder is not
writable but the file is (/etc/hosts given to a user once), in place.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from uproxy.model import ObjectName

BEGIN = "# BEGIN uproxy services (generated; edits here are overwritten)"
END = "# END uproxy services"


def hostnames(service: ObjectName, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    base = f"{service.name}.{service.namespace}"
    names = [base, f"{base}.svc"]
    if cluster_domain:
        names.append(f"{base}.svc.{cluster_domain.strip('.')}")
    return tuple(names)


def render_hosts(mapping: Mapping[ObjectName, str], cluster_domain: str = "cluster.local") -> str:
    """The uproxy block: one line per service, sorted by namespace/name."""
    lines = [BEGIN]
    for service in sorted(mapping):
        lines.append(f"{mapping[service]}\t{' '.join(hostnames(service, cluster_domain))}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def merge_block(existing: str, block: str) -> str:
    """`existing` with its uproxy block replaced by `block` (appended if absent)."""
    lines = existing.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN)
        end = next(i for i in range(start, len(lines)) if lines[i].rstrip("\n") == END)
    except StopIteration:
        prefix = existing
        if prefix and not prefix.endswith("\n"):
            prefix += "\n"
        return prefix + block
    return "".join(lines[:start]) + block + "".join(lines[end + 1:])


def write_hosts(path: str | Path, text: str) -> bool:
    """Put the block `text` into the file at `path`, keeping its other lines.

    Returns False when the file already said exactly that (nothing written).
    Raises OSError with the path when the file cannot be written.
    """
    target = Path(path)
    try:
        existing = target.read_text()
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        existing, mode = "", 0o644
    wanted = merge_block(existing, text)
    if wanted == existing:
        return False
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
    except PermissionError:
        # A file this user may write in a folder it may not (/etc/hosts made
        # writable once with `setfacl -m u:USER:rw /etc/hosts`): in place.
        target.write_text(wanted)
        return True
    try:
        with os.fdopen(fd, "w") as out:
            out.write(wanted)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        try:
            os.replace(temporary, target)
        except OSError as error:
            # A bind-mounted file (/etc/hosts in a container) cannot be replaced.
            if error.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM):
                raise
            target.write_text(wanted)
            os.unlink(temporary)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return True
