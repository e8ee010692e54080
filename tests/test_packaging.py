"""The wheel holds the whole package: every module and subfolder, the shipped configs and the search spaces,
and it works when installed on its own (dependencies reached from this interpreter, cpsc_ray only from it).
What the package declares is what it imports, with floors and no caps; the launch files install the same and
the image is built on the Ray that CI tests."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import cpsc_ray

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
import cpsc_ray.commands.config
from cpsc_ray.data import dataset_info
from cpsc_ray.method.engine import DistillEngine
from cpsc_ray.runs.teacher import load_teacher
from cpsc_ray.results.report import build_report
from cpsc_ray.cluster.tune.search_space import available_spaces, search_space_dirs
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


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DEPENDENCIES = [Requirement(line) for line in PROJECT["dependencies"]]
# The Ray CI tests: the one the README's test command installed into this interpreter.
RAY_VERSION = importlib.metadata.version("ray")


def _declared(*extras: str) -> set[str]:
    lines = PROJECT["dependencies"] + [line for extra in extras for line in PROJECT["optional-dependencies"][extra]]
    return {canonicalize_name(Requirement(line).name) for line in lines}


def _imported_modules(folder: Path) -> set[str]:
    """Top-level modules the files under ``folder`` import, lazy and optional imports inside functions included."""
    modules = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.partition(".")[0])
    return modules


@pytest.mark.parametrize(("folder", "extras"), [("cpsc_ray", ()), ("tests", ("test",))])
def test_every_imported_package_is_declared(folder, extras):
    """A package that arrives only through another one's dependencies can vanish in that one's next release."""
    root = REPO / folder
    # This repository's own modules, the benchmark scripts that tests import among them.
    own = {"cpsc_ray"} | {path.stem for path in [*root.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]}
    declared = _declared(*extras)
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(_imported_modules(root) - set(sys.stdlib_module_names) - own):
        providers = {canonicalize_name(name) for name in distributions.get(module, [])}
        if not providers & declared:
            undeclared[module] = sorted(providers) or "not installed"
    assert not undeclared, f"{folder}/ imports packages pyproject.toml does not declare: {undeclared}"


def test_every_requirement_has_a_floor_and_no_cap():
    """Floors are what CI installed (an older one is untested); caps are left to real incompatibilities."""
    for line in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]:
        requirement = Requirement(line)
        assert [spec.operator for spec in requirement.specifier] == [">="], line
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), f"{line}: installed {installed}"


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def test_the_image_is_the_ray_ci_tests_with_this_package_installed():
    steps = _dockerfile(REPO / "launch/Dockerfile")
    (base,) = [args for op, args in steps if op == "FROM"]
    image = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", base.strip())
    assert image, f"not an official Ray GPU image: {base}"
    assert image[1] == RAY_VERSION
    assert SpecifierSet(PROJECT["requires-python"]).contains(f"3.{image[2]}")
    # What the wheel is built from; the search spaces reach it through a symlink, so their folder must come too.
    search_spaces = (REPO / "cpsc_ray/search_spaces").resolve().relative_to(REPO).as_posix()
    needed = {"pyproject.toml", PROJECT["readme"], "cpsc_ray", search_spaces}
    copies = [i for i, (op, _) in enumerate(steps) if op == "COPY"]
    copied = {
        source.rstrip("/")
        for i in copies
        for source in [word for word in shlex.split(steps[i][1]) if not word.startswith("--")][:-1]
    }
    assert needed <= copied
    installs = [
        i for i, (op, args) in enumerate(steps) if op == "RUN" and re.search(r"\bpip install( -\S+)* \.( |$)", args)
    ]
    assert installs and installs[0] > max(copies), "pip install . must come after the sources are copied"
    ignore = (REPO / "launch/Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and {f"!{name}" for name in needed} <= set(ignore)


def test_the_launch_files_install_what_pyproject_declares():
    """cluster.yaml and runtime_env.yaml list the dependencies again (their nodes do not install cpsc-ray itself)."""

    def specs(lines):
        return {(canonicalize_name(r.name), frozenset(r.extras), r.specifier) for r in map(Requirement, lines)}

    (ray,) = [r for r in DEPENDENCIES if r.name == "ray"]
    others = [str(r) for r in DEPENDENCIES if r is not ray]
    cluster = yaml.safe_load((REPO / "launch/cluster.yaml").read_text())
    (install,) = [c for c in cluster["setup_commands"] if c.startswith("pip install")]
    pinned_ray = f"ray[{','.join(sorted(ray.extras))}]=={RAY_VERSION}"
    assert specs(w for w in shlex.split(install)[2:] if not w.startswith("-")) == specs([pinned_ray, *others])

    runtime_env = (REPO / "launch/runtime_env.yaml").read_text()
    commented = re.search(r"^#   (packages: \[.*?\])$", runtime_env, re.M | re.S)[1]
    packages = yaml.safe_load(re.sub(r"^#\s*", "", commented, flags=re.M))["packages"]
    assert specs(packages) == specs(others)

    rayjob = yaml.safe_load((REPO / "launch/rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert rayjob["rayVersion"] == RAY_VERSION
    groups = [rayjob["headGroupSpec"], *rayjob["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    # The tag launch/README.md builds: the package's one version.
    assert images == {f"ghcr.io/your-org/cpsc-ray:{cpsc_ray.__version__}"}
    assert f"# image_uri: ghcr.io/your-org/cpsc-ray:{cpsc_ray.__version__}" in runtime_env


def test_ci_lints_with_the_pinned_ruff_after_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    readme_test_command = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    assert readme_test_command in (REPO / "README.md").read_text() and readme_test_command in ci.splitlines()
    assert any(Requirement(line).name == "ruff" for line in PROJECT["optional-dependencies"]["dev"])
    assert ".venv/bin/pip install -e '.[dev]'" in ci
    assert ".venv/bin/ruff check ." in ci and ".venv/bin/ruff format --check ." in ci
