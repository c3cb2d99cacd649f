"""`tuneforge train` in two calls: a Trainer for a config (the recipe named by train.method, or one given),
and running it to its end."""

from __future__ import annotations

from tuneforge.config.schema import Config


def trainer(cfg: Config, resume: bool = False, log=print, recipe=None):
    """The loop for `cfg`, with its cheap checks done (run directory, lock, resume) and nothing loaded yet."""
    from tuneforge.train.core.loop import Trainer
    from tuneforge.train.recipes import recipe_for

    return Trainer(cfg, recipe if recipe is not None else recipe_for(cfg.train.method), resume=resume, log=log)


def run(cfg: Config, resume: bool = False, log=print, recipe=None) -> dict:
    """Train `cfg` to its end -> the summary. A run that dies ends `failed` (or `interrupted`) with its
    one-line reason in run_info.json."""
    return trainer(cfg, resume, log, recipe).fit()
