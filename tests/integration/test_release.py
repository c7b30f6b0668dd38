"""The release: `python -m build` gives a wheel and an sdist that install into a
clean virtualenv and run (`--version`, `explain` on the bundled example)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from uproxy import __version__

ROOT = Path(__file__).parent.parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def test_the_wheel_and_sdist_carry_the_version_and_every_package_file(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    assert wheel.name == f"uproxy-{__version__}-py3-none-any.whl"
    assert sdist.name == f"uproxy-{__version__}.tar.gz"
    # Every file of the package in this checkout: modules, uproxy/data/*, py.typed.
    package = {str(path.relative_to(ROOT)) for path in (ROOT / "uproxy").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert {"uproxy/data/example-services.yaml", "uproxy/data/status.html",
            "uproxy/py.typed"} <= package
    assert package <= set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as archive:
        in_sdist = {name.removeprefix(f"uproxy-{__version__}/") for name in archive.getnames()}
    # `python -m build` makes the wheel from the sdist, so this is what it had.
    assert package <= in_sdist


def test_the_wheel_installs_into_a_clean_venv_and_runs(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    uproxy = env_dir / "bin" / "uproxy"
    version = subprocess.run([str(uproxy), "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.stdout.strip() == f"uproxy {__version__}"
    # (Run from elsewhere: from this checkout, `python -c` would import it instead.)
    example = subprocess.run(
        [str(python), "-c", "from importlib import resources; print(resources.files('uproxy')"
                            ".joinpath('data/example-services.yaml'))"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path).stdout.strip()
    assert example.startswith(str(env_dir))  # the installed copy, not this checkout
    explained = subprocess.run([str(uproxy), "explain", "--services", example, "--rules", "nft"],
                               capture_output=True, text=True, timeout=60)
    assert explained.returncode == 0, explained.stderr
    assert "# Packet paths (nft backend)" in explained.stdout
