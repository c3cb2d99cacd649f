"""Custom datasets: a user registers a function or class, and references it from the config.

    from tuneforge.data.registry import register_dataset

    @register_dataset("support-tickets")
    def get_data(options):            # -> iterable of row dicts (any supported format)
        yield {"prompt": "...", "completion": "..."}

A class with `get_data(self)` or `get_sample(self, i)` + `__len__` works too. In the config:
`data.train: [{custom: support-tickets}]` or `{custom: "my_pkg.data:get_data"}`.

From the command line nothing imports the user's module, so a name registers through an installed
package's entry point, in its pyproject.toml:

    [project.entry-points."tuneforge.datasets"]
    support-tickets = "my_pkg.data:get_data"

A name needs no opt-in: installing the package was the user's own act, the config only names it.

A `module:attr` reference makes the config code: loading it imports that module and calls that
attribute (it could name `subprocess:Popen`). The config schema refuses such a reference unless the
config sets `data.allow_code: true` or the environment sets TUNEFORGE_ALLOW_CODE=1.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterator

from tuneforge.data.sources import Row
from tuneforge.errors import UserError

_REGISTRY: dict[str, Any] = {}


def register_dataset(name: str) -> Callable[[Any], Any]:
    def add(obj: Any) -> Any:
        if name in _REGISTRY and _REGISTRY[name] is not obj:
            raise ValueError(f"dataset name '{name}' is already registered ({_REGISTRY[name]!r}); pick another name")
        _REGISTRY[name] = obj
        return obj

    return add


ENTRY_POINT_GROUP = "tuneforge.datasets"


def _entry_points(name: str | None = None) -> list:
    from importlib.metadata import entry_points

    found = entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def _installed(ref: str) -> Any:
    """The object an installed package registers under `ref`, or None."""
    found = {ep.value: ep for ep in _entry_points(ref)}  # one package seen twice on sys.path is one entry
    if len(found) > 1:
        raise UserError(f"custom dataset '{ref}' is registered by several installed packages ({', '.join(sorted(found))}); "
                        "uninstall one, or use 'module:attr' with data.allow_code")
    if not found:
        return None
    ep = next(iter(found.values()))
    try:
        return ep.load()
    except (ImportError, AttributeError) as exc:
        raise UserError(f"custom dataset '{ref}': its entry point {ep.value!r} cannot be loaded ({exc}) (reinstall the package)") from None


def resolve(ref: str) -> Any:
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    if ":" not in ref:
        obj = _installed(ref)
        if obj is not None:
            return obj
    else:
        module, _, attr = ref.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"custom dataset '{ref}': cannot import ({exc})") from None
    known = ", ".join(sorted(set(_REGISTRY) | {ep.name for ep in _entry_points()})) or "none registered"
    raise UserError(f"custom dataset '{ref}' is not registered ({known}); register it with a '{ENTRY_POINT_GROUP}' "
                    "entry point of an installed package, or use 'module:attr' with data.allow_code")


def custom_rows(ref: str, options: dict) -> Iterator[Row]:
    obj = resolve(ref)
    if inspect.isclass(obj):
        obj = obj(**options) if options else obj()
        if hasattr(obj, "get_data"):
            items = obj.get_data()
        elif hasattr(obj, "get_sample"):
            items = (obj.get_sample(i) for i in range(len(obj)))
        else:
            raise UserError(f"custom dataset '{ref}': a class needs get_data() or get_sample(i) + __len__")
    else:
        items = obj(options) if inspect.signature(obj).parameters else obj()
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise UserError(f"custom dataset '{ref}' item {n}: expected a dict row, got {type(item).__name__}")
        yield Row(item, f"custom:{ref}", n)
