"""The training methods, one file each, keyed by `train.method`. A recipe is a small object the shared loop
calls (protocol: train/core/recipe.py); no recipe subclasses another."""

from __future__ import annotations

from tuneforge.train.recipes.dpo import DPORecipe
from tuneforge.train.recipes.grpo import GRPORecipe
from tuneforge.train.recipes.kto import KTORecipe
from tuneforge.train.recipes.orpo import ORPORecipe
from tuneforge.train.recipes.sft import SFTRecipe
from tuneforge.train.recipes.simpo import SimPORecipe


def _registry(*recipes: type) -> dict[str, type]:
    out: dict[str, type] = {}
    for cls in recipes:
        if cls.name in out:
            raise RuntimeError(f"two recipes are named {cls.name!r}: {out[cls.name].__name__} and {cls.__name__}")
        out[cls.name] = cls
    return out


RECIPES: dict[str, type] = _registry(
    SFTRecipe,
    DPORecipe,
    ORPORecipe,
    SimPORecipe,
    KTORecipe,
    GRPORecipe,
)


def recipe_for(method: str):
    """train.method -> a new recipe object."""
    return RECIPES[method]()
