"""Small explicit registries (name -> factory) for the platform's seams, open to installed plugins.

Configs name components by a short registry key (``model.name: dit``), never by an import path,
so a config cannot make the process import arbitrary code.

Plugins: a distribution adds members through an entry-point group (``tessera.models``, ``tessera.sources``, ...,
see :data:`GROUPS`), e.g. in its ``pyproject.toml``::

    [project.entry-points."tessera.models"]
    tiny = "my_pkg.models:FAMILY"        # the member itself (registered under "tiny"), or
    other = "my_pkg.more_models"         # a module whose import registers "other" with the decorator

Only what an administrator installed can be named, so the rule above still holds. A registry loads the entry
point of a name the first time that name is looked up and is not built in; a plugin that fails to import is an
error that names the plugin, its group and the import error.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import types
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

# Registry kind -> its entry-point group. A kind not listed maps to "tessera.<kind with _ for spaces>s".
GROUPS = {
    "model": "tessera.models", "text encoder": "tessera.text_encoders", "autoencoder": "tessera.autoencoders",
    "objective": "tessera.objectives", "sampler": "tessera.samplers", "source": "tessera.sources",
    "reward model": "tessera.rewards", "captioner": "tessera.captioners", "storage backend": "tessera.storage_backends",
    "cluster backend": "tessera.cluster_backends", "fine-tuning method": "tessera.finetune_methods",
}


def group_of(kind: str) -> str:
    """The entry-point group whose plugins extend the registry of ``kind``."""
    return GROUPS.get(kind, "tessera." + kind.replace(" ", "_").replace("-", "_") + "s")


class RegistryError(KeyError):
    """An unknown registry key; the message names the registry and the closest valid key."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


class Registry(Generic[T]):
    """A named mapping from keys to factories, filled by a decorator at import time."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group or group_of(kind)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``; a second registration of a name is an error."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the factory for ``name`` (loading an installed plugin of that name on first use) or raise with
        the closest valid key."""
        if name not in self._items and isinstance(name, str):
            self._load_plugin(name)
        try:
            return self._items[name]
        except KeyError:
            known = self.names()
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)}; plugins add more through the "
                f"entry-point group {self.group!r})"
            ) from None

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def _load_plugin(self, name: str) -> None:
        """Import the entry point named ``name`` in this registry's group, if one is installed."""
        ep = self._entry_points().get(name)
        if ep is None:
            return
        try:
            obj = ep.load()
        except Exception as exc:  # any import failure of third-party code: one error that says whose it is
            dist = f" (distribution {ep.dist.name})" if getattr(ep, "dist", None) else ""
            raise RegistryError(f"{self.kind} plugin {name!r}{dist} from entry-point group {self.group!r} failed "
                                f"to import {ep.value!r}: {type(exc).__name__}: {exc}") from exc
        if name in self._items:
            return  # a module that registered itself on import
        if isinstance(obj, types.ModuleType):
            raise RegistryError(f"{self.kind} plugin {name!r}: entry point {ep.value!r} (group {self.group!r}) is a "
                                f"module that registered no {self.kind} named {name!r}")
        self.register(name)(obj)

    def names(self) -> list[str]:
        """Registered keys and installed plugins' names (not imported until used), sorted."""
        return sorted(set(self._items) | set(self._entry_points()))

    def __contains__(self, name: object) -> bool:
        return name in self._items or (isinstance(name, str) and name in self._entry_points())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
