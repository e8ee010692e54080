"""What keeps the files earlier versions wrote working, in one place:

- module paths that moved: a teacher builder a config, a run's config.yaml or an experiment's setup.json names
  (``cpsc_ray.models:build_model``, from before the package was layered), and the classes Ray Tune pickled into
  an experiment's saved state (the search space and schedulers, before the cluster/tune/ package);
- a Tune experiment's saved state that names a module this version lacks (``cpsc_ray.tune``, from before the
  package was layered): Ray would fail deep inside unpickling it, so it is refused in one line;
- the results of a finalize rerun published before runs recorded their ``source_experiment``;
- an experiment record (setup.json) written before one of its fields was renamed.

One piece lives with the engine instead, since the method touches no files and imports nothing that does:
``method.device.device_rng_state`` reads the CUDA RNG state of checkpoints from before issue 11.
"""

from __future__ import annotations

import importlib
import pickletools
import sys

import pyarrow.fs as pafs

from cpsc_ray.errors import InputError
from cpsc_ray.layout import RootDir

# Old module path -> the module that replaced it. A prefix covers the modules under it.
MOVED_MODULES = {
    "cpsc_ray.models": "cpsc_ray.method.models",
    "cpsc_ray.cluster.schedulers": "cpsc_ray.cluster.tune.schedulers",
    "cpsc_ray.cluster.search_space": "cpsc_ray.cluster.tune.search_space",
}
PICKLE_PROTOCOL_2_OR_LATER = b"\x80"  # the PROTO opcode: how Ray's tuner.pkl and *-state-* files begin
STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
MEMO_GET_OPCODES = {"BINGET", "LONG_BINGET", "GET"}


def current_module(name: str) -> str:
    """``name`` with a moved prefix replaced, e.g. ``cpsc_ray.models.resnet`` -> ``cpsc_ray.method.models.resnet``."""
    for old, new in MOVED_MODULES.items():
        if name == old or name.startswith(f"{old}."):
            return new + name.removeprefix(old)
    return name


def alias_moved_modules() -> None:
    """Make each moved module importable by its old path too, for the unpickling Ray Tune does when it restores an
    experiment an earlier version saved (it offers no hook for mapping names, as pickle's Unpickler does)."""
    for old, new in MOVED_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))


def check_restorable(root: RootDir, experiment: str) -> None:
    """Raises a one-line InputError when the experiment's pickled Tune state refers to a cpsc_ray module or
    class that this version lacks."""
    for data in _pickled_state(root, experiment):
        for module, qualname in pickled_globals(data):
            if module.partition(".")[0] == "cpsc_ray" and not _resolves(current_module(module), qualname):
                raise InputError(
                    f"--resume: {root.uri(experiment)} was written by an earlier cpsc-ray: its Tune state refers to "
                    f"{module}.{qualname}, which this version lacks (its modules moved), so Ray Tune cannot continue "
                    f"it; run the search afresh under a new --name, or resume it with the cpsc-ray that wrote it"
                )


def pickled_globals(data: bytes) -> set[tuple[str, str]]:
    """(module, qualname) of every class or function a pickle refers to, read from its opcodes: nothing is
    imported or loaded."""
    found: set[tuple[str, str]] = set()
    strings: list[str | None] = []  # the strings pushed so far; STACK_GLOBAL takes the last two
    memo: dict[int, str | None] = {}
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":  # protocols 0-3: "module qualname"
            module, _, qualname = arg.partition(" ")
            found.add((module, qualname))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
            found.add((strings[-2], strings[-1]))
        elif opcode.name in STRING_OPCODES:
            strings.append(arg)
        elif opcode.name == "MEMOIZE":  # stores the top of the stack; only string entries are ever read back here
            memo[len(memo)] = strings[-1] if strings else None
        elif opcode.name in MEMO_GET_OPCODES:
            strings.append(memo.get(arg))
    return found


def _pickled_state(root: RootDir, experiment: str) -> list[bytes]:
    """The experiment directory's top-level pickles (tuner.pkl, searcher and search-generator state)."""
    directory = root.experiment(experiment)
    if not directory.exists():
        return []
    infos = directory.fs.get_file_info(pafs.FileSelector(directory.path()))
    files = [directory.read_bytes(info.base_name) for info in infos if info.type == pafs.FileType.File]
    return [data for data in files if data.startswith(PICKLE_PROTOCOL_2_OR_LATER)]


def _resolves(module: str, qualname: str) -> bool:
    try:
        target = importlib.import_module(module)
    except ModuleNotFoundError:
        return False
    for part in qualname.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def finalize_source_by_name(final: str, tuned: list[str]) -> str | None:
    """The tuning experiment (among ``tuned``) that a finalize rerun published before runs recorded their
    ``source_experiment`` reran: finalize named its rerun ``<EXP>-final``, or ``<EXP>-final-<timestamp>`` when
    that name was taken; the longest such ``<EXP>``."""
    candidates = [e for e in tuned if final == f"{e}-final" or final.startswith(f"{e}-final-")]
    return max(candidates, key=len, default=None)


def current_record_fields(stored: dict) -> dict:
    """An experiment record as an earlier version wrote it, its renamed fields under their current names:
    ``max_failures`` became ``max_restarts`` when Tune's own retries got the old name."""
    stored.setdefault("max_restarts", stored.get("max_failures", 0))
    return stored
