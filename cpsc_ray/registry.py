"""The one way a config names a piece of code: a ``Registry`` of entries by name. Models (``method.models``,
``teacher.arch``/``student.arch``), generator architectures (``method.generators``, ``generator.arch``), synthesizers
(``method.synthesis``, ``generator.kind``) and datasets (``data``, ``data.dataset``) each register theirs where they
are defined, so a new one is one decorator or one ``add``; ``cpsc-ray models`` lists them all. Where the config's type
enumerates the names (a Literal, so a config naming an unknown one fails as it loads), tests/test_cli.py checks that
the two agree."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from cpsc_ray.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: ``@REGISTRY.register("name")`` adds the class or function it decorates."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str, key: str | None = None) -> T:
        """The entry registered as ``name``; ``key`` is the config field that named it, for the error."""
        try:
            return self._entries[name]
        except KeyError:
            where = f"{key}: " if key else ""
            raise InputError(
                f"{where}unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())} (cpsc-ray models)"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
