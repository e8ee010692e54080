"""The wheel holds the whole package: every module and subfolder, the shipped configs and the search spaces,
and it works when installed on its own (dependencies reached from this interpreter, cpsc_ray only from it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a checkout holds beside the sources; a stale build/ in particular would leak deleted modules into the wheel.
OUTPUTS_AT_THE_ROOT = {".venv", ".git", "build", "dist", "runs"}


def _not_sources(directory: str, names: list[str]) -> set[str]:
    at_root = Path(directory) == REPO
    return {
        n for n in names if (at_root and n in OUTPUTS_AT_THE_ROOT) or n.endswith(("cache__", "_cache", ".egg-info"))
    }


IN_THE_VENV = """
import json, sys
import cpsc_ray
from cpsc_ray import cli, config, registry, storage
from cpsc_ray.commands import show
from cpsc_ray.data import dataset_info
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.runs.teacher import load_teacher
from cpsc_ray.results.report import build_report
from cpsc_ray.cluster.search_space import available_spaces, search_space_dirs
print(json.dumps({
    "package": cpsc_ray.__file__,
    "spaces": available_spaces(),
    "space_dirs": [str(d) for d in search_space_dirs()],
    "configs": config.shipped_config_names(),
}))
"""


def _package_files(root: Path) -> set[str]:
    """Source and data files of cpsc_ray under ``root``, as the wheel names them."""
    return {
        path.relative_to(root).as_posix()
        for path in (root / "cpsc_ray").rglob("*")
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the working tree, the way `pip wheel` builds any checkout."""
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, work / "src", symlinks=True, ignore=_not_sources)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(work / "src")],
        check=True,
        timeout=300,
    )
    (built,) = (work / "dist").glob("cpsc_ray-*.whl")
    return built


def test_the_wheel_holds_every_module_config_and_search_space(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _package_files(REPO) <= names  # search spaces come in through the symlink cpsc_ray/search_spaces
    assert {f"cpsc_ray/search_spaces/{p.name}" for p in (REPO / "search_spaces").glob("*.yaml")} <= names
    assert any(name.startswith("cpsc_ray/configs/") for name in names)


def test_the_installed_wheel_runs_alone(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # Installed before the dependencies are reachable, so pip sees no other cpsc_ray (this checkout's editable one).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    # The dependencies, from this interpreter's site-packages. A directory named in a .pth file gets no .pth
    # processing of its own, so an editable cpsc_ray installed there cannot leak in.
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site_packages) / "dependencies.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "usage: cpsc-ray" in run(str(bin_dir / "cpsc-ray"), "--help")
    found = json.loads(run(str(python), "-c", IN_THE_VENV))
    assert Path(found["package"]).is_relative_to(venv)
    assert found["spaces"] == sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))
    assert found["space_dirs"] and all(Path(d).is_relative_to(venv) for d in found["space_dirs"])
    assert found["configs"] == sorted(p.stem for p in (REPO / "cpsc_ray/configs").glob("*.yaml"))
