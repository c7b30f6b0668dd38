"""The command-line contract: flags, groups, one-line errors."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from uproxy.cli import UsageError, build_parser, main, parse_settings
from uproxy.durations import PortRange


def test_defaults_match_the_design() -> None:
    settings, cleanup = parse_settings(["--services", "s.yaml"])
    assert not cleanup
    assert settings.source.kind == "file"
    assert settings.listeners.udp_timeout == 30
    assert settings.sync.sync_period == 30 and settings.sync.min_sync_period == 1
    assert settings.web.healthz_bind == ("0.0.0.0", 10256)
    assert settings.web.metrics_bind == ("127.0.0.1", 10249)
    assert settings.rules.chain_prefix == "UPROXY"
    assert settings.rules_backend == "iptables"
    assert settings.shutdown_grace == 10


def test_laptop_mode_resolves_rules_to_none() -> None:
    settings, _ = parse_settings(["--services", "s.yaml", "--bind-range", "127.77.0.0/16"])
    assert settings.listeners.bind_range == ipaddress.ip_network("127.77.0.0/16")
    assert settings.rules_backend == "none"
    # A laptop does not open its health port to its network; a flag still wins.
    assert settings.web.healthz_bind == ("127.0.0.1", 10256)
    assert settings.web.metrics_bind == ("127.0.0.1", 10249)
    settings, _ = parse_settings(["--services", "s.yaml", "--bind-range", "127.77.0.0/16",
                                  "--healthz-bind-address", "0.0.0.0:10256"])
    assert settings.web.healthz_bind == ("0.0.0.0", 10256)


def test_kube_proxy_flag_names_are_accepted() -> None:
    settings, cleanup = parse_settings([
        "--iptables-sync-period", "1m", "--iptables-min-sync-period", "250ms",
        "--proxy-port-range", "30000+99", "--udp-timeout", "5s", "--bind-address", "127.0.0.1",
        "--cleanup",
    ])
    assert cleanup
    assert settings.sync.sync_period == 60 and settings.sync.min_sync_period == 0.25
    assert settings.listeners.proxy_port_range == PortRange(30000, 30099)
    assert settings.listeners.udp_timeout == 5
    assert settings.listeners.bind_address == "127.0.0.1"
    assert settings.source.kind == "kube"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--udp-timeout", "30"], "--udp-timeout: '30' needs a unit"),
        (["--proxy-port-range", "0-0"], "--proxy-port-range: '0-0' is an empty port range"),
        (["--bind-range", "127.77.0.1/16"], "--bind-range: '127.77.0.1/16' is not a CIDR"),
        (["--bind-address", "nope"], "--bind-address"),
        (["--min-sync-period", "1m", "--sync-period", "30s"], "--min-sync-period: must not"),
        (["--services", "x", "--master", "http://127.0.0.1:1"], "--services: cannot be combined"),
        (["--bind-range", "127.77.0.0/16", "--rules", "nft"], "--rules nft: laptop mode"),
        (["--healthz-bind-address", "10256"], "--healthz-bind-address: '10256' is not HOST:PORT"),
        (["--metrics-bind-address", "example:80"],
         "--metrics-bind-address: 'example:80': 'example' is not an IP address"),
        (["--metrics-bind-address", "127.0.0.1:70000"],
         "--metrics-bind-address: '127.0.0.1:70000': port '70000' is not a number 0-65535"),
        (["--workers", "0"], "--workers"),
        (["--chain-prefix", "a b"], "--chain-prefix"),
        (["--rules", "ipvs"], "--rules"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_settings(argv)


def test_main_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--udp-timeout", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("uproxy: error: --udp-timeout:")


def test_empty_web_address_disables_the_server() -> None:
    settings, _ = parse_settings(["--healthz-bind-address", "", "--metrics-bind-address", ""])
    assert settings.web.healthz_bind is None and settings.web.metrics_bind is None


@pytest.mark.parametrize(("text", "bind"), [
    ("localhost:10249", ("127.0.0.1", 10249)), (":10249", ("0.0.0.0", 10249)),
    ("[::1]:0", ("::1", 0)), ("[::]:10256", ("::", 10256)),
])
def test_web_addresses_are_parsed_once_into_settings(text: str, bind: tuple[str, int]) -> None:
    settings, _ = parse_settings(["--metrics-bind-address", text])
    assert settings.web.metrics_bind == bind


def test_help_is_grouped() -> None:
    text = build_parser().format_help()
    for group in ("source", "listeners", "kernel rules", "sync", "observability", "lifecycle"):
        assert f"\n{group}" in text
    assert "explain" in text and "demo" in text


@pytest.mark.parametrize(("command", "says"), [
    ("demo", "Start small backends on 127.0.0.1"),
    ("explain", "--services PATH       the services file or folder to explain"),
])
def test_each_subcommand_has_its_own_help(command: str, says: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: uproxy {command} ") and says in text


@pytest.mark.parametrize("argv", [["--udp-timeout", "-1s"], ["--shutdown-grace", "-5s"]])
def test_a_negative_value_is_judged_as_a_value(argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"uproxy: error: {argv[0]}: '{argv[1]}' is not a duration")


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "uproxy", "--version"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.startswith("uproxy ")


@pytest.mark.parametrize(("argv", "dial"), [
    (["--bind-range", "127.77.0.0/16"], "auto"),  # laptop mode with the Kubernetes source
    (["--bind-range", "127.77.0.0/16", "--services", "s.yaml"], "direct"),
    (["--bind-range", "127.77.0.0/16", "--workers", "2"], "direct"),
    ([], "direct"),  # rules mode: a node reaches its pods
    (["--bind-range", "127.77.0.0/16", "--dial", "portforward"], "portforward"),
    (["--bind-range", "127.77.0.0/16", "--dial", "direct"], "direct"),
])
def test_dial_defaults_to_auto_only_where_port_forward_can_help(
        argv: list[str], dial: str) -> None:
    settings, _ = parse_settings(argv)
    assert settings.listeners.dial == dial


@pytest.mark.parametrize(("argv", "says"), [
    (["--services", "s.yaml", "--bind-range", "127.77.0.0/16", "--dial", "portforward"],
     "--dial portforward: needs the Kubernetes source"),
    (["--dial", "auto"], "--dial auto: only in laptop mode (--bind-range)"),
    (["--bind-range", "127.77.0.0/16", "--workers", "2", "--dial", "portforward"],
     "--dial portforward: not with --workers 2"),
])
def test_dial_combinations_that_cannot_work_are_one_line(argv: list[str], says: str) -> None:
    with pytest.raises(UsageError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_settings(argv)


def test_context_reaches_the_kubernetes_source_settings() -> None:
    settings, _ = parse_settings(["--context", "staging"])
    assert settings.source.context == "staging"
    assert "dialing" in build_parser().format_help()
