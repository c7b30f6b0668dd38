"""The services file source: Services, EndpointSlices and Nodes from YAML/JSON.

A file holds Kubernetes objects (multi-document YAML, a `kind: List`, or the
JSON of either, exactly as `kubectl get svc,endpointslices -A -o yaml|json`
prints them) or the short form (`services: [...]`, see the README). A Node
named as this node (--hostname-override) gives its zone to topology hints. A folder
loads every *.yaml, *.yml and *.json in it, in name order, as one set.

`FileSource` reloads when the file changes (inotify on its folder wakes it,
`uproxy.sources.watch`, else a poll; either way the file's inode, size and
mtime say whether it did; a file still being written is waited for) and when
`reload()` is called (the app's SIGHUP handler). A bad file is one `file:line: field: reason`
line; the last good state keeps serving. A file that loads but will not do
what it seems to (a short-form service whose endpoints are all of the other
IP family, so it has none) is logged as one warning line at each load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uproxy.heap import collector_paused
from uproxy.model import EndpointSlice, Node, ObjectName, Service
from uproxy.sources.base import Source, SourceSink, replace_all
from uproxy.sources.objects import (
    FieldPath,
    Memo,
    ObjectError,
    describe,
    format_path,
    node_from_dict,
    service_from_dict,
    short_form_entries,
    slice_from_dict,
)
from uproxy.sources.watch import Watch

log = logging.getLogger(__name__)

SOURCE_NAME = "file"
FILE_SUFFIXES = (".yaml", ".yml", ".json")
LIST_KINDS = {"List": None, "ServiceList": "Service", "EndpointSliceList": "EndpointSlice",
              "NodeList": "Node"}
_NONE_HINT = "write 'services: []' for no services"
_MAX_SETTLE_ROUNDS = 25  # debounce gives up waiting for quiet after this many rounds
_RACY_NS = 100_000_000  # file timestamps tick coarsely (a jiffy); 100 ms is well past one
# `- [fd00::1]:8080` unquoted is a YAML flow sequence followed by junk
_UNQUOTED_V6 = re.compile(r"(^|[\s,\[])\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]:\d")

# A file larger than this is refused before it is read (a kubectl dump of
# 10k services is ~30 MB).
MAX_FILE_BYTES = 256 * 1024 * 1024
# YAML aliases let a few hundred bytes stand for billions of nodes. A document
# may expand to at most this many times the nodes it was written with, plus
# the allowance (Kubernetes' YAML decoder refuses "excessive aliasing" too).
MAX_ALIAS_EXPANSION = 10
ALIAS_ALLOWANCE = 10_000

# libyaml is much faster on big `kubectl get -A` dumps and keeps node marks too.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Services = dict[ObjectName, Service]
Slices = dict[ObjectName, EndpointSlice]
Nodes = dict[ObjectName, Node]


class SourceFileError(Exception):
    """A services file (or folder) that cannot be loaded; `str()` is one line."""


def load_services_file(
    path: Path, warn: Callable[[str], None] | None = None
) -> tuple[Services, Slices]:
    """Every Service and EndpointSlice in the file or folder at `path` (see `load_objects`)."""
    loaded = load_objects(path, warn)
    return loaded.services, loaded.slices


@dataclass(frozen=True)
class Loaded:
    services: Services
    slices: Slices
    nodes: Nodes  # a node's zone (topology hints) is read from its Node here


def load_objects(path: Path, warn: Callable[[str], None] | None = None,
                 memo: Memo | None = None) -> Loaded:
    """Every Service, EndpointSlice and Node in the file or folder at `path`.

    With `memo` (the watching source keeps one), entries equal to the last
    load's are not converted again.

    Raises SourceFileError naming the file, line and field of the first problem.
    Something that loads but will not do what it seems to (a short-form
    service whose endpoints are all of the other IP family) is one
    `file:line: ns/name: ...` line passed to `warn` (default: a log warning)
    after the whole file loaded.
    """
    collected = _Collected(memo=memo)
    try:
        with collector_paused():  # a load makes ~10 acyclic containers per entry
            for file in _files_of(path):
                for document in _documents(file):
                    _load_document(collected, document)
    except BaseException:
        if memo is not None:
            memo.failed()
        raise
    if memo is not None:
        memo.done()
    for warning in collected.warnings:
        if warn is None:
            log.warning("%s", warning)
        else:
            warn(warning)
    return Loaded(collected.services, collected.slices, collected.nodes)


def _files_of(path: Path) -> list[Path]:
    try:
        if not path.is_dir():
            return [path]
        files = sorted(
            entry for entry in path.iterdir()
            if entry.suffix in FILE_SUFFIXES and not entry.name.startswith(".")
            and entry.is_file()
        )
    except OSError as error:
        raise SourceFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if not files:
        raise SourceFileError(f"{path}: no *.yaml, *.yml or *.json files in this folder")
    return files


class _Document:
    """One parsed document and a way to find the line of any field in it.

    YAML keeps its node tree from parsing. JSON is parsed by the json module
    (much faster) and its node tree is composed only when an error needs a line.
    """

    def __init__(self, file: Path, data: Any, node: yaml.Node | None = None,
                 json_text: str | None = None) -> None:
        self.file = file
        self.data = data
        self._node = node
        self._json_text = json_text

    def node(self) -> yaml.Node | None:
        if self._node is None and self._json_text is not None:
            # JSON that YAML 1.1 disagrees with gets no line numbers
            with contextlib.suppress(yaml.YAMLError):
                self._node = yaml.compose(self._json_text, Loader=_Loader)
            self._json_text = None
        return self._node

    def where(self, path: FieldPath) -> str:
        line = _line_of(self.node(), path)
        return f"{self.file}:{line}" if line is not None else str(self.file)

    def fail(self, path: FieldPath, reason: str) -> SourceFileError:
        parts = [self.where(path), format_path(path), reason]
        return SourceFileError(": ".join(part for part in parts if part))


def _documents(file: Path) -> list[_Document]:
    """The non-empty documents of a file."""
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SourceFileError(f"{file}: {size} bytes, more than the {MAX_FILE_BYTES} "
                                  "a services file may have")
        raw = file.read_bytes()
    except OSError as error:
        raise SourceFileError(f"{file}: cannot read: {error.strerror or error}") from None
    if not raw.strip():
        raise SourceFileError(f"{file}: empty file ({_NONE_HINT})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SourceFileError(f"{file}: not UTF-8 text (byte {error.start})") from None

    # JSON is YAML too, but the json module reads it many times faster: a
    # YAML-named file that holds JSON (`kubectl get -o json > svc.yaml`, a
    # generated file) takes the fast path and falls back to YAML if it fails.
    if file.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            if file.suffix == ".json":
                raise SourceFileError(
                    f"{file}:{error.lineno}: invalid JSON: {error.msg}") from None
        except RecursionError:
            raise SourceFileError(f"{file}: invalid JSON: nested too deeply") from None
        else:
            return [_Document(file, data, json_text=text)]

    documents: list[_Document] = []
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                _check_expansion(file, node)
            data = None if node is None else _construct(loader, node, {})
            if node is not None and data is not None:  # an empty document between two '---'
                documents.append(_Document(file, data, node))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = error.problem or error.context or "cannot parse"
        if mark is not None and _UNQUOTED_V6.search(_line_text(text, mark.line)):
            problem += " (quote IPv6 endpoints: '[fd00::1]:8080')"
        raise SourceFileError(f"{file}{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise SourceFileError(f"{file}: invalid YAML: {_one_line(str(error))}") from None
    except RecursionError:
        raise SourceFileError(f"{file}: invalid YAML: nested too deeply or recursive") from None
    finally:
        loader.dispose()
    if not documents:
        raise SourceFileError(f"{file}: no objects in the file ({_NONE_HINT})")
    return documents


_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"


def _check_expansion(file: Path, root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it far beyond what was written.

    Composing is linear (an alias is the very node it names); what would
    explode is walking the data. Each node's expanded size is counted once
    (memoised by identity), so this costs one pass over the written nodes.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()  # the nodes on the way down: meeting one again is a cycle

    def expanded(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in active:
            line = node.start_mark.line + 1 if node.start_mark is not None else 1
            raise SourceFileError(f"{file}:{line}: invalid YAML: an alias refers to itself")
        active.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(expanded(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(expanded(key) + expanded(value) for key, value in node.value)
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    total = expanded(root)
    limit = ALIAS_ALLOWANCE + MAX_ALIAS_EXPANSION * len(sizes)
    if total > limit:
        line = root.start_mark.line + 1 if root.start_mark is not None else 1
        raise SourceFileError(
            f"{file}:{line}: YAML aliases expand this document to {total} nodes from "
            f"{len(sizes)} written (at most {limit}); refused, as an alias bomb would be")


def _construct(loader: yaml.SafeLoader, node: yaml.Node, built: dict[int, Any]) -> Any:
    """Python data for a node: what SafeLoader builds, about 20x faster.

    PyYAML's constructor is pure Python and took most of the time on a large
    `kubectl get -A -o yaml`; the plain tags kubectl writes are built here, and
    anything else (timestamps, merge keys, odd keys) is left to the constructor.
    A node (an anchor and its aliases) is built once and shared, as PyYAML
    does: `built` maps node identity to its data.
    """
    tag = node.tag
    if tag == _STR:
        return node.value
    known = built.get(id(node))
    if known is not None:
        return known
    data: Any
    if tag == _MAP and all(
        isinstance(key, yaml.ScalarNode) and key.tag != _MERGE for key, _ in node.value
    ):
        data = built[id(node)] = {}
        for key, value in node.value:
            data[_construct(loader, key, built)] = _construct(loader, value, built)
        return data
    if tag == _SEQ:
        data = built[id(node)] = []
        data.extend(_construct(loader, item, built) for item in node.value)
        return data
    if tag == _INT and node.value.isdigit() and (node.value[0] != "0" or node.value == "0"):
        return int(node.value)
    if tag == _NULL:
        return None
    if tag == _BOOL and isinstance(node, yaml.ScalarNode):
        return loader.construct_yaml_bool(node)
    return loader.construct_object(node, deep=True)


def _line_text(text: str, index: int) -> str:
    lines = text.splitlines()
    return lines[index] if 0 <= index < len(lines) else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _line_of(node: yaml.Node | None, path: FieldPath) -> int | None:
    """Line (1-based) of the deepest node along `path` that exists."""
    if node is None:
        return None
    for part in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    child = value
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
        if child is None:
            break
        node = child
    return node.start_mark.line + 1


@dataclass
class _Collected:
    services: Services = field(default_factory=dict)
    slices: Slices = field(default_factory=dict)
    nodes: Nodes = field(default_factory=dict)
    # where each object was read, turned into file:line only for an error message
    origins: dict[tuple[type, ObjectName], tuple[_Document, FieldPath]] = field(
        default_factory=dict
    )
    warnings: list[str] = field(default_factory=list)  # one line each, file:line first
    memo: Memo | None = None

    def add(self, obj: Service | EndpointSlice | Node, document: _Document,
            path: FieldPath) -> None:
        """Keep `obj`; raise if an object of the same kind and name came earlier."""
        kind = type(obj)
        key = obj.key
        first = self.origins.get((kind, key))
        if first is not None:
            earlier, earlier_path = first
            raise document.fail(
                path, f"duplicate {kind.__name__} {key} (first at {earlier.where(earlier_path)})"
            )
        self.origins[kind, key] = (document, path)
        if kind is Service:
            self.services[key] = obj  # type: ignore[assignment]
        elif kind is Node:
            self.nodes[key] = obj  # type: ignore[assignment]
        else:
            self.slices[key] = obj  # type: ignore[assignment]


def _load_document(collected: _Collected, document: _Document) -> None:
    data = document.data
    if not isinstance(data, Mapping):
        raise document.fail(
            (), f"expected a Kubernetes object or a 'services:' mapping, got {describe(data)}"
        )
    if "kind" not in data and "services" in data:
        _load_short_form(collected, document, data)
        return
    kind = data.get("kind")
    if isinstance(kind, str) and kind in LIST_KINDS:
        items = data.get("items")
        if items is not None and not isinstance(items, list):
            raise document.fail(("items",), f"must be a list, got {describe(items)}")
        for index, item in enumerate(items or ()):
            _load_object(collected, document, ("items", index), item, LIST_KINDS[kind])
        return
    _load_object(collected, document, (), data, None)


def _load_object(
    collected: _Collected, document: _Document, prefix: FieldPath,
    data: Any, default_kind: str | None,
) -> None:
    if not isinstance(data, Mapping):
        raise document.fail(prefix, f"must be a mapping, got {describe(data)}")
    kind = data.get("kind", default_kind)
    memo = collected.memo
    known = memo.get(kind, data) if memo is not None and isinstance(kind, str) else None
    if known is not None:
        collected.add(known, document, (*prefix, "metadata", "name"))
        return
    obj: Service | EndpointSlice | Node
    try:
        if kind == "Service":
            obj = service_from_dict(data, "")
        elif kind == "EndpointSlice":
            obj = slice_from_dict(data, "")
        elif kind == "Node":
            obj = node_from_dict(data, "")
        elif kind is None:
            raise ObjectError("", "kind", "is required (Service, EndpointSlice, Node or List), "
                              "or use the short form 'services:'", ("kind",))
        else:
            raise ObjectError("", "kind", f"must be Service, EndpointSlice, Node or List, "
                              f"got {describe(kind)}", ("kind",))
    except ObjectError as error:
        raise document.fail((*prefix, *error.path), error.reason) from None
    if memo is not None:
        memo.keep(kind, data, obj)
    collected.add(obj, document, (*prefix, "metadata", "name"))


def _load_short_form(
    collected: _Collected, document: _Document, data: Mapping[str, Any]
) -> None:
    try:
        entries = short_form_entries(data, "", collected.memo)
    except ObjectError as error:
        raise document.fail(error.path, error.reason) from None
    for index, (service, slices, mismatch) in enumerate(entries):
        collected.add(service, document, ("services", index, "name"))
        for endpoint_slice in slices:
            collected.add(endpoint_slice, document, ("services", index, "endpoints"))
        if mismatch is not None:
            where = document.where(("services", index, "endpoints"))
            collected.warnings.append(f"{where}: {service.key}: {mismatch}")


# -- the watching source ----------------------------------------------------

Fingerprint = tuple[tuple[str, int, int, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """What changes when the file or folder is edited, replaced, added to or removed from."""
    def stat(entry: Path) -> tuple[str, int, int, int, int]:
        try:
            st = entry.stat()
        except OSError:
            return (entry.name, -1, -1, -1, -1)
        return (entry.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    own = stat(path)
    try:
        if not path.is_dir():
            return (own,)
        entries = sorted(
            e for e in path.iterdir()
            if e.suffix in FILE_SUFFIXES and not e.name.startswith(".")
        )
    except OSError:
        return (own,)
    return (own, *(stat(entry) for entry in entries))


def _racy(seen: Fingerprint) -> bool:
    """True when a file changed so recently that another write could land in the
    same filesystem timestamp tick with the same size and go unnoticed."""
    age = time.time_ns() - max(entry[3] for entry in seen)
    return 0 <= age < _RACY_NS


class FileSource(Source):
    """Reports the services file's objects to a sink, and every later difference."""

    name = SOURCE_NAME

    # Without inotify, a stat() of the file (or folder entries) four times a
    # second costs nothing and keeps an edit's way to the listeners under half a
    # second. With it, a stat() a second is the safety net for missed events.
    def __init__(self, path: Path, *, debounce: float = 0.2, poll_interval: float = 0.25,
                 safety_interval: float = 1.0) -> None:
        self.path = path
        self.debounce = debounce
        self.poll_interval = poll_interval
        self.safety_interval = safety_interval
        self._watch = Watch(path, poll_interval)
        self._memo = Memo()  # a reload converts only the entries that changed
        self._reported_services: Services = {}
        self._reported_slices: Slices = {}
        self._reported_nodes: Nodes = {}
        self._initial: Loaded | None = None
        self._seen: Fingerprint | None = None  # fingerprint before the last load attempt
        self._recheck = False  # the last load was racy: load once more at the next poll
        self._last_error: str | None = None
        self._failed_at: Fingerprint | None = None  # the file as it was at that error
        self._last_warnings: list[str] = []
        self._reload_requested = asyncio.Event()

    def load_initial(self) -> None:
        """Load the file once before running; a bad file raises SourceFileError (fatal at start)."""
        seen = fingerprint(self.path)
        warnings: list[str] = []
        self._initial = load_objects(self.path, warnings.append, self._memo)
        self._seen, self._recheck = seen, _racy(seen)
        self._warn(warnings, recheck=False)

    def reload(self) -> None:
        """Reload now (the app's SIGHUP handler); call it from the loop's thread."""
        self._reload_requested.set()

    async def run(self, sink: SourceSink) -> None:
        self._watch.start()  # before the first load: a write right after it wakes us
        try:
            synced = False
            if self._initial is not None:
                self._report(sink, self._initial)
                self._initial = None
                sink.on_synced(SOURCE_NAME)
                synced = True
            else:
                synced = await self._load(sink, synced, recheck=False)
            while True:
                trigger = await self._wait_for_trigger()
                if trigger is not None:
                    synced = await self._load(sink, synced, recheck=trigger == "recheck")
        finally:
            self._watch.close()

    async def _wait_for_trigger(self) -> str | None:
        """Wait for an event, a SIGHUP or one poll; say why to load ("reload",
        "changed", "recheck") or None."""
        watching = self._watch.active
        # A file read in the same timestamp tick as its write (`_recheck`) is
        # read again: at the next poll, or, watched, at the next event (another
        # write, even one that leaves size and stamp as they were) or safety
        # check. Not sooner: right after a large reload the loop is busy with its
        # sync, and a second read then (50 ms at 10k services) delays serving.
        interval = self.safety_interval if watching else self.poll_interval
        reload = asyncio.ensure_future(self._reload_requested.wait())
        change = asyncio.ensure_future(self._watch.wait(interval))
        try:
            await asyncio.wait({reload, change}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (reload, change):
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            return "reload"
        now = fingerprint(self.path)
        if now == self._seen:
            return "recheck" if self._recheck else None
        if watching and change.done() and not change.cancelled() and change.result():
            # inotify said a write ended; a file still open for writing wakes us
            # again when it is closed, so there is nothing to wait for.
            return "changed"
        # Changed: wait until it stays the same for one debounce period, so an
        # editor or `kubectl get > file` that writes in pieces is read once, whole.
        for _ in range(_MAX_SETTLE_ROUNDS):
            await asyncio.sleep(self.debounce)
            later = fingerprint(self.path)
            if later == now:
                break
            now = later
        return "changed"

    async def _load(self, sink: SourceSink, synced: bool, *, recheck: bool) -> bool:
        seen = fingerprint(self.path)
        self._seen, self._recheck = seen, _racy(seen)
        warnings: list[str] = []
        try:
            loaded = await asyncio.to_thread(load_objects, self.path, warnings.append,
                                             self._memo)
        except SourceFileError as error:
            message = str(error)
            if message == self._last_error and seen == self._failed_at:
                # The same bad file again (a recheck, a SIGHUP): said once already.
                if not recheck:
                    log.info("services file %s is unchanged and still not loaded (the error "
                             "above); the last good state keeps serving", self.path)
                return synced
            self._last_error, self._failed_at = message, seen
            log.error("%s", message)
            sink.on_source_error(SOURCE_NAME, message)
            return synced
        recovered = self._last_error is not None
        self._last_error = self._failed_at = None
        self._warn(warnings, recheck=recheck)
        changes = self._report(sink, loaded)
        if synced:
            if changes or recovered:
                log.info("services file %s %s: %s", self.path,
                         "loads again" if recovered else "reloaded",
                         describe_changes(changes) if changes else "no changes")
            return True
        sink.on_synced(SOURCE_NAME)
        return True

    def _warn(self, warnings: list[str], *, recheck: bool) -> None:
        """Log a load's warnings; a recheck of the same file does not repeat them."""
        if not (recheck and warnings == self._last_warnings):
            for warning in warnings:
                log.warning("%s", warning)
        self._last_warnings = warnings

    def _report(self, sink: SourceSink, loaded: Loaded) -> ServiceChanges:
        """Report what differs; what happened to each service, by name."""
        changes: ServiceChanges = {}

        def on_service(previous: Service | None, current: Service | None) -> None:
            sink.on_service(previous, current)
            known = previous or current
            assert known is not None
            changes[known.key] = ("added" if previous is None else
                                  "removed" if current is None else "changed")

        def on_slice(previous: EndpointSlice | None, current: EndpointSlice | None) -> None:
            sink.on_slice(previous, current)
            known = previous or current
            assert known is not None
            changes.setdefault(known.service, "changed")

        replace_all(self._reported_services, loaded.services, on_service)
        replace_all(self._reported_slices, loaded.slices, on_slice)
        replace_all(self._reported_nodes, loaded.nodes, sink.on_node)
        return changes


ServiceChanges = dict[ObjectName, str]  # service -> "added" | "changed" | "removed"


def describe_changes(changes: ServiceChanges, shown: int = 5) -> str:
    """`default/web added, default/db removed`; past `shown` names, counts per kind."""
    if len(changes) <= shown:
        return ", ".join(f"{name} {what}" for name, what in sorted(changes.items()))
    counts: dict[str, int] = {}
    for what in changes.values():
        counts[what] = counts.get(what, 0) + 1
    return ", ".join(f"{count} service{'s' if count != 1 else ''} {what}"
                     for what, count in sorted(counts.items()))
