"""The batcher: the one place that decides which units an optimizer step, a process and a micro-batch see.

Inputs: the prepared units (a unit is one item, or one bin of items with packing: bins), the batch shape
(micro_batch_size, grad_accum, world size) and the seed. Output for (step, rank): a `StepBatch` of typed
`MicroBatch`es. The order depends only on (seed, epoch), never on how many processes ran before, so

- a resumed run sees exactly the micro-batches the uninterrupted run saw (no data state to save), and
- the union over ranks of one step is the same set of units for any world size with the same global batch.

With `length` (an item's token count: train.group_by_length) each epoch's shuffled order is cut into groups of
GROUP_STEPS steps and each group sorted by length, longest first, so a step holds units of similar length
(less padding); still a function of (seed, epoch) only.

Items are opaque here (SFT samples, preference pairs): a recipe's collate turns a MicroBatch into tensors.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
GROUP_STEPS = 50  # steps sorted together by train.group_by_length (as transformers' LengthGroupedSampler's mega-batches)


@dataclass(frozen=True)
class MicroBatch(Generic[T]):
    """One forward pass of one process. `rows[r]` holds the items that share row r of the batch tensor
    (one item per row unpadded, several back to back when packed)."""

    rows: list[list[T]]
    units: list[int] = field(default_factory=list)  # unit ids, for tests and logs
    dummy: bool = False  # eval filler so every rank runs the same number of forwards (ZeRO-3/FSDP); never counted

    @property
    def items(self) -> list[T]:
        return [x for row in self.rows for x in row]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class StepBatch(Generic[T]):
    """Everything one process sees in one optimizer step: `grad_accum` micro-batches."""

    step: int  # 0-based optimizer step
    epoch: int
    micro: list[MicroBatch[T]]

    @property
    def items(self) -> list[T]:
        return [x for mb in self.micro for x in mb.items]


class Batcher(Generic[T]):
    """Deals shuffled units out to (step, rank, micro-batch).

    layout: "rows" = one item per row (padded batches, or one bin per row with bins: each unit is a row),
    "packed" = all the micro-batch's items in one row (padding-free packing).
    """

    def __init__(self, items: Sequence[T], units: list[list[int]] | None, micro_batch_size: int, grad_accum: int,
                 world: int, seed: int, layout: str = "rows", length: Callable[[T], int] | None = None):
        if layout not in ("rows", "packed"):
            raise ValueError(f"layout must be 'rows' or 'packed', not {layout!r}")
        self.items = items
        self.units = units if units is not None else [[i] for i in range(len(items))]
        self.micro_batch_size, self.grad_accum, self.world, self.seed = micro_batch_size, grad_accum, world, seed
        self.layout = layout
        self.lengths = [sum(length(items[i]) for i in unit) for unit in self.units] if length else None

    @property
    def units_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        # The tail of an epoch that does not fill a whole step is dropped (every step has the same shape).
        return len(self.units) // self.units_per_step

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps or math.ceil(epochs * self.steps_per_epoch)

    def signature(self) -> str:
        """What decides which units each step sees; a resume must not change it mid-run."""
        return (f"layout={self.layout} units={len(self.units)} step={self.units_per_step} "
                f"mbs={self.micro_batch_size} accum={self.grad_accum} world={self.world}"
                + (" group_by_length" if self.lengths is not None else ""))

    def epoch_order(self, epoch: int) -> list[int]:
        # Seeded per epoch with its own generator: independent of any global RNG state, so resume is exact.
        order = list(range(len(self.units)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if self.lengths is None:
            return order
        group = self.units_per_step * GROUP_STEPS
        return [u for k in range(0, len(order), group)
                for u in sorted(order[k : k + group], key=lambda u: -self.lengths[u])]  # stable: ties keep the shuffle

    def step_units(self, step: int, rank: int) -> tuple[int, list[list[int]]]:
        """-> (epoch, unit ids per micro-batch) of `rank` at `step`."""
        if self.steps_per_epoch == 0:
            raise ValueError("fewer units than one optimizer step needs")
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chunk = order[within * self.units_per_step : (within + 1) * self.units_per_step]
        per_rank = self.micro_batch_size * self.grad_accum
        mine = chunk[rank * per_rank : (rank + 1) * per_rank]
        mbs = self.micro_batch_size
        return epoch, [mine[k : k + mbs] for k in range(0, len(mine), mbs)]

    def step(self, step: int, rank: int = 0) -> StepBatch[T]:
        epoch, micro_units = self.step_units(step, rank)
        return StepBatch(step, epoch, [self._micro(u) for u in micro_units])

    def _micro(self, unit_ids: list[int]) -> MicroBatch[T]:
        rows = [[self.items[i] for i in self.units[u]] for u in unit_ids]
        if self.layout == "packed":
            rows = [[x for row in rows for x in row]]
        return MicroBatch(rows, list(unit_ids))


def eval_batches(items: Sequence[T], micro_batch_size: int, rank: int, world: int, layout: str = "rows") -> list[MicroBatch[T]]:
    """This rank's share of an eval set, in micro-batches; every rank gets the same number of micro-batches
    (a rank short of data gets `dummy` ones to run and not count), because a sharded model (ZeRO-3, FSDP)
    needs every rank in every forward. The shares of all ranks together cover each item exactly once."""
    if not items:
        return []
    shard = list(range(rank, len(items), world))
    n = math.ceil(math.ceil(len(items) / world) / micro_batch_size)
    out = []
    for k in range(n):
        ids = shard[k * micro_batch_size : (k + 1) * micro_batch_size]
        dummy = not ids
        rows = [[items[i]] for i in (ids or [0])]
        if layout == "packed":
            rows = [[x for row in rows for x in row]]
        out.append(MicroBatch(rows, ids, dummy=dummy))
    return out
