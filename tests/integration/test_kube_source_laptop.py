"""Laptop-mode pieces of the kube source: finding the cluster configuration
(kubeconfig, KUBECONFIG, ~/.kube/config, --master, in-cluster), the node
name, and the hosts-file fragment."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client as kube_client

from tests.conftest import require_system
from tests.kubeapi import FakeKubeAPI, service
from uproxy.commands.arguments import node_name
from uproxy.hostsfile import BEGIN, END, merge_block, render_hosts, write_hosts
from uproxy.model import ObjectName
from uproxy.sources.kube import KubeConfigError, KubeSource, load_kube_config


def kubeconfig(path: Path, server: str, token: str = "sekret") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
    }))
    return path


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    server = FakeKubeAPI()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_explicit_kubeconfig_reaches_the_api(api: FakeKubeAPI, tmp_path: Path) -> None:
    api.create(service("default", "web"))
    path = kubeconfig(tmp_path / "config", api.url)
    configuration = await load_kube_config(kubeconfig=str(path), environ={})
    assert configuration.host == api.url
    assert configuration.api_key["BearerToken"] == "Bearer sekret"
    async with kube_client.ApiClient(configuration) as c:
        listed = await kube_client.CoreV1Api(c).list_service_for_all_namespaces()
    assert [s.metadata.name for s in listed.items] == ["web"]


async def test_kubeconfig_env_then_home_then_master_override(tmp_path: Path) -> None:
    env_path = kubeconfig(tmp_path / "from-env", "http://127.0.0.1:1001")
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    kubeconfig(home / ".kube" / "config", "http://127.0.0.1:1002")
    from_env = await load_kube_config(environ={"KUBECONFIG": str(env_path), "HOME": str(home)})
    assert from_env.host == "http://127.0.0.1:1001"
    from_home = await load_kube_config(environ={"HOME": str(home)})
    assert from_home.host == "http://127.0.0.1:1002"
    overridden = await load_kube_config(kubeconfig=str(env_path), master="http://127.0.0.1:9/",
                                        environ={})
    assert overridden.host == "http://127.0.0.1:9"
    assert overridden.api_key["BearerToken"] == "Bearer sekret"  # credentials kept
    bare = await load_kube_config(master="http://127.0.0.1:7", environ={"HOME": str(home)})
    assert bare.host == "http://127.0.0.1:7" and not bare.api_key


async def test_in_cluster_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes_asyncio.config import incluster_config

    token = tmp_path / "token"
    token.write_text("pod-token")
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked until a TLS connection is made")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    configuration = await load_kube_config(
        environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOME": str(tmp_path)})
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.api_key["BearerToken"] == "Bearer pod-token"


async def test_configuration_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match=r"^--kubeconfig: .*/missing: no such file$"):
        await load_kube_config(kubeconfig=str(tmp_path / "missing"), environ={})
    with pytest.raises(KubeConfigError, match=r"^KUBECONFIG: /nowhere: no such file$"):
        await load_kube_config(environ={"KUBECONFIG": "/nowhere"})
    with pytest.raises(KubeConfigError, match="no cluster configuration"):
        await load_kube_config(environ={"HOME": str(tmp_path)})
    # The source fails at prepare(), before anything runs.
    source = KubeSource(kubeconfig=str(tmp_path / "missing"), environ={})
    with pytest.raises(KubeConfigError, match="no such file"):
        await source.prepare()
    broken = tmp_path / "broken"
    broken.write_text("current-context: nowhere\n")
    with pytest.raises(KubeConfigError) as raised:
        await load_kube_config(kubeconfig=str(broken), environ={})
    assert str(raised.value).startswith(str(broken)) and "\n" not in str(raised.value)


def test_node_name_is_lowercased_override_or_hostname() -> None:
    assert node_name(" Node-A ") == "node-a"
    assert node_name() == os.uname().nodename.strip().lower()


def test_render_hosts_names_every_service_three_ways() -> None:
    text = render_hosts({ObjectName("shop", "web"): "127.77.0.2",
                         ObjectName("default", "db"): "127.77.0.1"})
    assert text.splitlines() == [
        BEGIN,
        "127.77.0.1\tdb.default db.default.svc db.default.svc.cluster.local",
        "127.77.0.2\tweb.shop web.shop.svc web.shop.svc.cluster.local",
        END,
    ]


def test_write_hosts_keeps_other_lines_and_is_atomic(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    hosts.chmod(0o640)
    first = render_hosts({ObjectName("default", "web"): "127.77.0.1"})
    assert write_hosts(hosts, first)
    assert write_hosts(hosts, first) is False  # unchanged: not rewritten
    second = render_hosts({ObjectName("default", "api"): "127.77.0.9"})
    assert write_hosts(hosts, second)
    content = hosts.read_text()
    assert content == "127.0.0.1 localhost\n::1 localhost\n" + second
    assert "web.default" not in content
    assert stat.S_IMODE(hosts.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]  # no temporary left


def test_write_hosts_creates_the_file_and_merge_handles_no_newline(tmp_path: Path) -> None:
    target = tmp_path / "uproxy.hosts"
    block = render_hosts({})
    assert write_hosts(target, block)
    assert target.read_text() == block
    assert merge_block("10.0.0.1 x", block) == "10.0.0.1 x\n" + block


def test_a_hosts_file_writable_in_a_folder_that_is_not_is_written_in_place() -> None:
    """/etc/hosts given to a user once (`setfacl -m u:USER:rw /etc/hosts`): uproxy,
    as that user, cannot make a temporary file in /etc, so it writes in place."""
    require_system("setpriv")
    folder = Path(tempfile.mkdtemp(prefix="uproxy-hosts-"))
    try:
        folder.chmod(0o755)  # root's: uid 65534 may not create files here
        hosts = folder / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        hosts.chmod(0o666)
        block = render_hosts({ObjectName("default", "web"): "127.77.0.1"})
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", "import sys; from uproxy.hostsfile import write_hosts; "
                   "print(write_hosts(sys.argv[1], sys.argv[2]))", str(hosts), block],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
        assert done.stdout.strip() == "True", done.stderr
        assert hosts.read_text() == "127.0.0.1 localhost\n" + block
        assert sorted(p.name for p in folder.iterdir()) == ["hosts"]
    finally:
        shutil.rmtree(folder)
