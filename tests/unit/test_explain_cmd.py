"""`uproxy explain` as a user runs it: no root, nothing touched, one line per error."""

from __future__ import annotations

from pathlib import Path

import pytest

from uproxy.cli import main


def explain_main(argv: list[str]) -> int:
    return main(["explain", *argv])

SERVICES = """\
services:
  - name: web
    clusterIP: 198.18.0.10
    ports: [{name: http, port: 80, targetPort: 8080}]
    endpoints: [127.0.0.1, 127.0.0.2]
"""


@pytest.fixture
def services(tmp_path: Path) -> Path:
    path = tmp_path / "services.yaml"
    path.write_text(SERVICES)
    return path


@pytest.mark.parametrize(("backend", "marker"), [
    ("iptables", "-A UPROXY-PORTALS-CONTAINER -d 198.18.0.10/32 -p tcp -m tcp --dport 80"),
    ("iptc", "-A UPROXY-PORTALS-CONTAINER -d 198.18.0.10/32 -p tcp -m tcp --dport 80"),
    ("nft", '198.18.0.10 . tcp . 80 comment "default/web:http" : 30000'),
    ("none", "clients connect to 0.0.0.0:30000 directly"),
])
def test_explain_prints_rules_and_paths_for_every_backend(
        services: Path, backend: str, marker: str, capsys: pytest.CaptureFixture[str]) -> None:
    # iptc on an nf_tables host (as here) would refuse to run, but explain only renders.
    code = explain_main(["--services", str(services), "--rules", backend,
                         "--proxy-port-range", "30000-30009"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"# Packet paths ({backend} backend)" in out
    assert marker in out
    assert "then the listener dials: round-robin over 127.0.0.1:8080, 127.0.0.2:8080" in out
    if backend == "iptc":
        assert "# IPv4: libiptc (python-iptables)" in out


@pytest.mark.parametrize(("argv", "says"), [
    (["--chain-prefix", "A-VERY-LONG-PREFIX"], "--chain-prefix 'A-VERY-LONG-PREFIX'"),
    (["--proxy-port-range", "0-0"], "--proxy-port-range: '0-0' is an empty port range"),
])
def test_bad_flags_are_one_line_errors(services: Path, argv: list[str], says: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert explain_main(["--services", str(services), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uproxy explain: error: ") and says in err
    assert err.count("\n") == 1


def test_a_missing_services_file_is_one_line_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert explain_main(["--services", str(tmp_path / "none.yaml")]) == 1
    assert capsys.readouterr().err == (f"uproxy explain: error: {tmp_path / 'none.yaml'}: "
                                       "cannot read: No such file or directory\n")


@pytest.mark.parametrize(("backend", "ipv6"), [("nft", "table ip6 uproxy"),
                                               ("iptables", "ip6tables-restore")])
def test_an_ipv4_only_file_gets_no_ipv6_rules(
        services: Path, backend: str, ipv6: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert explain_main(["--services", str(services), "--rules", backend]) == 0
    out = capsys.readouterr().out
    assert ipv6 not in out
    assert "No clusterIP" not in out


def test_services_without_a_cluster_ip_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "services.yaml"
    path.write_text("services:\n  - name: web\n    ports: [{port: 80}]\n"
                    "    endpoints: [127.0.0.1]\n")
    assert explain_main(["--services", str(path), "--rules", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# No clusterIP: default/web (rules mode installs no portal")
    assert "clients connect to 0.0.0.0:30000 directly" in out


def test_services_without_a_cluster_ip_get_example_addresses_said_plainly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "services.yaml"
    path.write_text("services:\n  - name: web\n    ports: [{name: http, port: 80}, "
                    "{name: https, port: 443}]\n"
                    "    endpoints: [127.0.0.1]\n  - name: db\n    ports: [{port: 5432}]\n")
    assert explain_main(["--services", str(path), "--rules", "nft", "--compare"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Example addresses: these services have no clusterIP")
    assert "#   default/db   10.96.0.100\n#   default/web  10.96.0.101\n" in out
    # Both ports of a service share its example address, in every dump.
    assert '10.96.0.101 . tcp . 80 comment "default/web:http" : 30001' in out
    assert '10.96.0.101 . tcp . 443 comment "default/web:https" : 30002' in out
    assert "ipvsadm -A -t 10.96.0.101:443 -s rr" in out
    assert "# Placeholder ports: the proxy ports here (30000-30002) are placeholders" in out
    assert "No clusterIP" not in out
