"""Fuzzing what users type: every services file and every command line gives a
value or a one-line error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from uproxy.cli import UsageError, build_parser, parse_settings
from uproxy.sources.file import SourceFileError, load_services_file

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Words the reader looks for, so generated documents get past the first checks.
KEYS = ["services", "name", "namespace", "ports", "port", "targetPort", "protocol", "nodePort",
        "endpoints", "clusterIP", "clusterIPs", "sessionAffinity", "kind", "apiVersion",
        "metadata", "spec", "items", "type", "labels", "addressType", "addresses",
        "conditions", "ready", "selector", "externalIPs", "status", "loadBalancer",
        "sessionAffinityConfig", "clientIP", "timeoutSeconds", "internalTrafficPolicy",
        "externalTrafficPolicy", "kubernetes.io/service-name", "x"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-70000, 70000), st.floats(allow_nan=False),
    st.sampled_from(["Service", "EndpointSlice", "List", "v1", "discovery.k8s.io/v1", "TCP",
                     "UDP", "SCTP", "ClientIP", "None", "IPv4", "IPv6", "FQDN", "NodePort",
                     "LoadBalancer", "ExternalName", "Local", "198.18.0.1", "127.0.0.1:80",
                     "[fd00::1]:80", "fd00::1", "http", "", "default", "web"]),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)),
    max_leaves=30,
)
DOCUMENTS = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
    st.fixed_dictionaries({"services": st.lists(
        st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8), max_size=3)}),
    st.fixed_dictionaries({"apiVersion": st.just("v1"), "kind": st.just("List"),
                           "items": st.lists(st.dictionaries(st.sampled_from(KEYS), VALUES,
                                                             max_size=6), max_size=3)}),
)


def _one_line_or_value(path: Path) -> None:
    try:
        load_services_file(path)
    except SourceFileError as error:
        message = str(error)
        assert message and "\n" not in message, message
        assert message.startswith(str(path)), message


@FUZZ
@given(document=DOCUMENTS, as_json=st.booleans())
def test_any_document_loads_or_is_one_line(tmp_path: Path, document: Any, as_json: bool) -> None:
    path = tmp_path / ("fuzz.json" if as_json else "fuzz.yaml")
    path.write_text(json.dumps(document) if as_json else yaml.safe_dump(document))
    _one_line_or_value(path)


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text_loads_or_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    _one_line_or_value(path)


FLAGS = [action for action in build_parser()._actions if action.option_strings]
FLAG_NAMES = sorted({name for action in FLAGS for name in action.option_strings
                     if name not in ("-h", "--help", "--version")})
TOKENS = st.one_of(
    st.sampled_from(FLAG_NAMES),
    st.sampled_from(["30s", "-1s", "0", "1", "-2", "250ms", "10249", ":10249", "localhost:0",
                     "127.0.0.1:0", "[::1]:0", "127.77.0.0/16", "::1/128", "10.0.0.1/8",
                     "30000-30010", "30000+5", "0-0", "nft", "iptables", "auto", "none",
                     "text", "json", "", "x", "explain", "--", "-v", "-vv"]),
    st.text(max_size=10),
)


@FUZZ
@given(argv=st.lists(TOKENS, max_size=8))
def test_any_command_line_gives_settings_or_one_line(argv: list[str]) -> None:
    assume(not {"-h", "--help", "--version"} & set(argv))  # these print and exit 0
    if any(token in ("explain", "demo") for token in argv):
        argv = [t for t in argv if t not in ("explain", "demo")]
    try:
        parse_settings(argv)
    except UsageError as error:
        message = str(error)
        assert message and "\n" not in message, message
