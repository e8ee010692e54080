"""``cpsc-ray config`` and ``cpsc-ray models``: a resolved config, every field's meaning and default, and the
names a config can give its models, generators and datasets."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cpsc_ray.commands import add_config_args
from cpsc_ray.config import Config, flatten, load_config, to_yaml
from cpsc_ray.errors import InputError

BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def add_commands(commands: argparse._SubParsersAction) -> None:
    show = commands.add_parser(
        "config", help="print the resolved config; with --show, what every field means and its default"
    )
    add_config_args(show)
    show.add_argument(
        "--show",
        nargs="?",
        const="",
        metavar="KEY",
        help="describe every field (or a section's, e.g. loss, or one field, e.g. loss.alpha): its default, type "
        "and meaning, whatever --config holds",
    )
    show.set_defaults(func=cmd_config)
    models = commands.add_parser(
        "models", help="list the models, generators, synthesizers and datasets a config can name"
    )
    models.set_defaults(func=cmd_models)


def cmd_config(args: argparse.Namespace) -> int:
    if args.show is None:
        print(to_yaml(load_config(args.config, args.overrides)), end="")
    else:
        print(describe_fields(args.show))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cpsc_ray.data import DATASETS
    from cpsc_ray.method.generators import GENERATORS
    from cpsc_ray.method.models import MODELS
    from cpsc_ray.method.synthesis import SYNTHESIZERS

    for title, keys, names in (
        ("models", "teacher.arch, student.arch", MODELS.names()),
        ("generators", "generator.arch", GENERATORS.names()),
        ("synthesizers", "generator.kind", SYNTHESIZERS.names()),
        ("datasets", "data.dataset", DATASETS.names()),
    ):
        print(f"{title} ({keys}):\n  " + "  ".join(names))
    print(
        "a teacher of your own: teacher.builder='package.module:function' with teacher.kwargs and teacher.weights "
        "(cpsc-ray config --show teacher)"
    )
    return 0


def describe_fields(key: str = "") -> str:
    """Each field under ``key`` (a section or a field; empty: all) as ``key: default  (type, bounds)`` over
    its description."""
    defaults = flatten(Config())
    shown = [(name, field) for name, field in config_fields(Config) if not key or f"{name}.".startswith(f"{key}.")]
    if not shown:
        sections = [name for name, field in Config.model_fields.items() if _is_section(field)]
        raise InputError(f"config --show {key}: no such field or section; sections: {', '.join(sections)}")
    lines = []
    for name, field in shown:
        lines.append(f"{name}: {_as_yaml(defaults[name])}  ({', '.join([_type_text(field), *_bounds(field)])})")
        lines += textwrap.wrap(field.description or "", 100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def config_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) of every leaf field, sections expanded, in declaration order."""
    for name, field in model.model_fields.items():
        if _is_section(field):
            yield from config_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def choices(field: FieldInfo) -> list[str]:
    """The values a Literal field accepts."""
    return [str(value) for value in get_args(field.annotation)]


def _is_section(field: FieldInfo) -> bool:
    return _is_class(field.annotation) and issubclass(field.annotation, BaseModel)


def _is_class(annotation: Any) -> bool:
    """A plain class such as ``int``; ``list[float]`` passes isinstance(..., type) too, so its origin is checked."""
    return isinstance(annotation, type) and get_origin(annotation) is None


def _type_text(field: FieldInfo) -> str:
    if get_origin(field.annotation) is Literal:
        return " | ".join(choices(field))
    if _is_class(field.annotation):
        return field.annotation.__name__
    return str(field.annotation).replace("typing.", "")


def _bounds(field: FieldInfo) -> list[str]:
    return [
        f"{symbol} {getattr(rule, attr)}" for rule in field.metadata for attr, symbol in BOUNDS if hasattr(rule, attr)
    ]


def _as_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("...\n").strip()
