"""Stop a run that went wrong before it wastes more GPU time, and keep the best checkpoint.

- NaN/inf loss or gradient norm: stop at once. The step that produced it must not be checkpointed,
  so the last checkpoint on disk is the last good one.
- Loss above `loss_watchdog_threshold` for `loss_watchdog_patience` consecutive steps: stop (seed 001's keys).
- Eval loss not improved for `early_stopping_patience` evals: stop (a normal end, not a failure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuneforge.errors import UserError


class Diverged(UserError):
    """The run produced NaN/inf or stayed above the loss threshold; the message says which and where."""


@dataclass
class Watchdog:
    threshold: float | None = None
    patience: int = 3
    early_stopping_patience: int | None = None
    above: int = 0
    best_eval: float = math.inf
    best_step: int | None = None
    evals_without_gain: int = 0

    @classmethod
    def from_config(cls, train_cfg) -> "Watchdog":
        return cls(getattr(train_cfg, "loss_watchdog_threshold", None), getattr(train_cfg, "loss_watchdog_patience", 3),
                   getattr(train_cfg, "early_stopping_patience", None))

    def check_step(self, step: int, loss: float, grad_norm: float | None) -> None:
        """Raise Diverged if this step's numbers say the run is broken."""
        for name, value in (("loss", loss), ("gradient norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                raise Diverged(f"step {step}: {name} is {value} (lower train.lr, check the data, or use "
                               "mixed_precision bf16 instead of fp16); the last checkpoint is from before this step")
        if self.threshold is None:
            return
        self.above = self.above + 1 if loss > self.threshold else 0
        if self.above >= self.patience:
            raise Diverged(f"step {step}: loss {loss:.4g} above train.loss_watchdog_threshold={self.threshold:g} for "
                           f"{self.above} steps (lower train.lr or raise the threshold)")

    def check_eval(self, step: int, eval_loss: float) -> tuple[bool, bool]:
        """Record an eval; returns (is_new_best, should_stop_early)."""
        if not math.isfinite(eval_loss):
            raise Diverged(f"step {step}: eval loss is {eval_loss}; the last checkpoint is from before this eval")
        best = eval_loss < self.best_eval
        if best:
            self.best_eval, self.best_step, self.evals_without_gain = eval_loss, step, 0
        else:
            self.evals_without_gain += 1
        stop = self.early_stopping_patience is not None and self.evals_without_gain >= self.early_stopping_patience
        return best, stop

    def state(self) -> dict:
        """What a checkpoint keeps so a resumed run decides exactly as an uninterrupted one."""
        return {"above": self.above, "best_eval": self.best_eval if math.isfinite(self.best_eval) else None,
                "best_step": self.best_step, "evals_without_gain": self.evals_without_gain}

    def load_state(self, state: dict | None) -> None:
        if not state:
            return
        self.above = state.get("above", 0)
        self.best_eval = state["best_eval"] if state.get("best_eval") is not None else math.inf
        self.best_step = state.get("best_step")
        self.evals_without_gain = state.get("evals_without_gain", 0)
