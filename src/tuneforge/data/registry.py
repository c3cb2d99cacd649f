"""Custom datasets: a user registers a function or class, and references it from the config.

    from tuneforge.data.registry import register_dataset

    @register_dataset("support-tickets")
    def get_data(options):            # -> iterable of row dicts (any supported format)
        yield {"prompt": "...", "completion": "..."}

A class with `get_data(self)` or `get_sample(self, i)` + `__len__` works too. In the config:
`data.train: [{custom: support-tickets}]` or `{custom: "my_pkg.data:get_data"}`.

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


def resolve(ref: str) -> Any:
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    if ":" in ref:
        module, _, attr = ref.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"custom dataset '{ref}': cannot import ({exc})") from None
    known = ", ".join(sorted(_REGISTRY)) or "none registered"
    raise UserError(f"custom dataset '{ref}' is not registered ({known}); use a registered name or 'module:attr'")


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
