"""A name-to-builder registry. Models register under a name (``register_model`` in ``cpsc_ray.method.models``)
and a config names them by it (``teacher.arch``, ``student.arch``), so a new model is one decorator. Generators
and datasets are fixed sets that the config's types enumerate (``generator.arch``, ``data.dataset``): a config
naming an unknown one fails as it loads. ``cpsc-ray models`` lists all three."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from cpsc_ray.errors import InputError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(builder: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = builder
            return builder

        return add

    def get(self, name: str, key: str | None = None) -> T:
        """The builder registered as ``name``; ``key`` is the config field that named it, for the error."""
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
