"""Search spaces: YAML files of dotted run-config keys, each with a distribution.

    params:
      loss.alpha: {distribution: loguniform, low: 0.5, high: 20}
      train.g_steps: {distribution: int, low: 1, high: 8}
      generator.nz: {distribution: choice, values: [64, 128, 256]}

Spaces are found by name (``cpsc_pbt``) in ``./search_spaces`` of a checkout or a ``ray job submit``
working dir, then among the spaces installed with the package; or by path.
"""

from __future__ import annotations

import difflib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from cpsc_ray.config import Config, flatten
from cpsc_ray.errors import InputError
from cpsc_ray.method.engine import MODEL_SHAPING_KEYS

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")

# Keys a running trial cannot take a new value for: what shapes the models (the engine's list), the
# data, the teacher, the budget and the run's identity.
FIXED_DURING_RUN = (
    *MODEL_SHAPING_KEYS,
    "data.",
    "teacher.",
    "teacher_training.",
    "train.epochs",
    "train.iterations_per_epoch",
    "train.batch_size",
    "train.device",
    "train.compile",
    "seed",
    "name",
    "output_dir",
    "eval.",
)


class SearchSpaceError(InputError):
    """A search space that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Param:
    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def to_tune(self):
        if self.distribution == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.distribution == "uniform":
            return tune.uniform(self.low, self.high)
        if self.distribution == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # inclusive high, as written
        return tune.choice(list(self.values))

    def pbt_values(self) -> Any:
        if self.distribution == "int":
            return list(range(int(self.low), int(self.high) + 1))
        return list(self.values) if self.distribution == "choice" else self.to_tune()

    @property
    def bounds(self) -> tuple[float, float]:
        if self.distribution == "choice":
            return min(self.values), max(self.values)
        return self.low, self.high


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str
    params: dict[str, Param]

    def to_tune(self) -> dict[str, Any]:
        return {key: param.to_tune() for key, param in self.params.items()}

    def check_perturbable(self, scheduler: str = "pbt") -> None:
        """PBT and PB2 change values mid-run: every key must be one the engine can take mid-run, and PB2,
        which models each key as a number in its bounds, takes no choice of names or flags."""
        for key, param in self.params.items():
            if key.startswith(FIXED_DURING_RUN) or key in FIXED_DURING_RUN:
                raise SearchSpaceError(
                    f"search space {self.source}: {key} cannot be perturbed mid-run (it is fixed for a run's life: "
                    f"it shapes the models, data or budget); search it with --search optuna and seed PBT from "
                    f"that experiment (--seed-from), or set it in the run config"
                )
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in param.values)
            if scheduler == "pb2" and param.distribution == "choice" and not numeric:
                raise SearchSpaceError(
                    f"search space {self.source}: {key} is a choice of {list(param.values)}, which PB2 cannot "
                    f"model (it proposes numbers between bounds); use --scheduler pbt, or a space without {key}"
                )

    def check_holds(self, point: dict[str, Any], what: str) -> None:
        """Optuna can start a trial only at a choice the space lists (elsewhere it fails deep inside Ray, with
        the experiment started): refuse a starting point outside the choices, naming the key and the fix."""
        for key, param in self.params.items():
            if param.distribution == "choice" and key in point and point[key] not in param.values:
                raise SearchSpaceError(
                    f"{what}: the config's {key}={point[key]!r} is not among search space {self.source}'s choices "
                    f"{list(param.values)}; set it to one of them (e.g. {key}={param.values[0]!r}), or add it to the "
                    f"space's values"
                )

    def pbt_mutations(self) -> dict[str, Any]:
        """What PBT's explore may do to each key. Ray multiplies a number by 0.8 or 1.2, which rounding
        undoes for small integers (1 * 1.2 -> 1) or drives out of bounds (1 * 0.8 -> 0), and which it also
        applies to a ``tune.choice`` (a name times 1.2 fails; 0 stays 0): integers and choices are given as
        their list of values, which Ray's explore moves one step left or right (or resamples)."""
        return {key: p.pbt_values() for key, p in self.params.items()}

    def clamp(self, config: dict[str, Any]) -> dict[str, Any]:
        """A perturbed config put back inside the space (PBT's ``custom_explore_fn``): Ray does not clip,
        so over a long run multiplied loss weights and rates would drift past their bounds."""
        for key, p in self.params.items():
            if key in config and p.distribution in ("loguniform", "uniform"):
                config[key] = min(max(config[key], p.low), p.high)
        return config

    def pb2_bounds(self) -> dict[str, list[float]]:
        return {key: list(param.bounds) for key, param in self.params.items()}


def search_space_dirs() -> list[Path]:
    """The working directory's search_spaces/ (a checkout, a `ray job submit` working dir), then the package's
    own: in a checkout a symlink to the top-level folder, in an installed wheel its copy."""
    candidates = [
        (Path.cwd() / "search_spaces").resolve(),
        (Path(str(importlib.resources.files("cpsc_ray"))) / "search_spaces").resolve(),
    ]
    return [d for i, d in enumerate(candidates) if d.is_dir() and d not in candidates[:i]]


def available_spaces() -> list[str]:
    return sorted({p.stem for d in search_space_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def locate(space: str) -> Path:
    path = Path(space)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SearchSpaceError(f"search space {space}: file not found")
        return path
    for directory in search_space_dirs():
        if (directory / f"{space}.yaml").is_file():
            return directory / f"{space}.yaml"
    raise SearchSpaceError(
        f"search space {space!r}: no such file or named space; give a YAML path or one of: "
        f"{', '.join(available_spaces())}"
    )


def _number(source: str, key: str, spec: dict, field: str) -> float:
    value = spec.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchSpaceError(f"search space {source}: {key}: '{field}' must be a number, got {value!r}")
    return float(value)


def parse_param(source: str, key: str, spec: Any, config_keys: dict[str, Any]) -> Param:
    if key not in config_keys:
        close = difflib.get_close_matches(key, list(config_keys), n=1)
        hint = f"; did you mean {close[0]}?" if close else "; see `cpsc-ray config` for the keys"
        raise SearchSpaceError(f"search space {source}: {key} is not a run-config key{hint}")
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise SearchSpaceError(
            f"search space {source}: {key}: expected a mapping with 'distribution' "
            f"({', '.join(DISTRIBUTIONS)}), got {spec!r}"
        )
    kind = spec["distribution"]
    if kind not in DISTRIBUTIONS:
        raise SearchSpaceError(
            f"search space {source}: {key}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}"
        )
    extra = set(spec) - ({"distribution", "values"} if kind == "choice" else {"distribution", "low", "high"})
    if extra:
        raise SearchSpaceError(f"search space {source}: {key}: unexpected field(s) {sorted(extra)} for {kind}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(f"search space {source}: {key}: 'values' must be a non-empty list")
        param = Param(key, kind, values=tuple(values))
    else:
        low, high = _number(source, key, spec, "low"), _number(source, key, spec, "high")
        if not low < high:
            raise SearchSpaceError(
                f"search space {source}: {key}: empty range, low={low:g} must be below high={high:g}"
            )
        if kind == "loguniform" and low <= 0:
            raise SearchSpaceError(f"search space {source}: {key}: loguniform needs low > 0, got {low:g}")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise SearchSpaceError(f"search space {source}: {key}: int bounds must be whole numbers")
        param = Param(key, kind, low, high)
    return param


def load_search_space(space: str, base: Config | None = None) -> SearchSpace:
    """Read and validate a search space; every sample it can draw must make a valid run config."""
    path = locate(space)
    source = str(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SearchSpaceError(f"search space {source}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict) or not tree["params"]:
        raise SearchSpaceError(f"search space {source}: expected a non-empty 'params:' mapping of dotted config keys")
    unknown = set(tree) - {"params", "description"}
    if unknown:
        raise SearchSpaceError(
            f"search space {source}: unknown top-level key(s) {sorted(unknown)}; use params, description"
        )
    base = base or Config()
    config_keys = flatten(base)
    params = {key: parse_param(source, key, spec, config_keys) for key, spec in tree["params"].items()}
    _check_samples_validate(source, base, params)
    return SearchSpace(path.stem, source, params)


def _check_samples_validate(source: str, base: Config, params: dict[str, Param]) -> None:
    from cpsc_ray.config import with_values

    for corner in ("low", "high"):
        values = {}
        for key, param in params.items():
            if param.distribution == "choice":
                values[key] = param.values[0] if corner == "low" else param.values[-1]
            else:
                value = param.low if corner == "low" else param.high
                values[key] = int(value) if param.distribution == "int" else value
        try:
            with_values(base, values)
        except InputError as err:
            raise SearchSpaceError(
                f"search space {source}: its {corner} corner is not a valid run config: {err}"
            ) from None
