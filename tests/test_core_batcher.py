"""The batcher alone decides which units a (step, rank) sees: properties that make resume and sharding provable."""

import pytest

from tuneforge.data.batcher import Batcher, MicroBatch, StepBatch, eval_batches


def make(world=1, mbs=2, accum=2, n=40, seed=7, layout="rows", units=None):
    return Batcher(list(range(n)), units, mbs, accum, world, seed, layout)


def test_step_batch_is_typed_and_shaped():
    sb = make().step(0, 0)
    assert isinstance(sb, StepBatch) and sb.step == 0 and sb.epoch == 0
    assert len(sb.micro) == 2 and all(isinstance(mb, MicroBatch) and len(mb.rows) == 2 for mb in sb.micro)
    assert all(len(row) == 1 for mb in sb.micro for row in mb.rows)
    packed = make(layout="packed").step(0, 0)
    assert [len(mb.rows) for mb in packed.micro] == [1, 1] and packed.items == sb.items  # same items, one row


def test_epoch_covers_every_unit_once_and_epochs_reshuffle():
    b = make(n=41)  # 41 units, 4 per step: 10 steps, the last unit dropped
    assert b.steps_per_epoch == 10
    epoch0 = [x for s in range(10) for x in b.step(s).items]
    assert len(set(epoch0)) == 40 and set(epoch0) <= set(range(41))
    epoch1 = [x for s in range(10, 20) for x in b.step(s).items]
    assert epoch1 != epoch0 and b.step(10).epoch == 1


def test_same_global_batch_same_units_for_any_world_size():
    one = make(world=1, mbs=4, accum=2)
    two = make(world=2, mbs=2, accum=2)
    four = make(world=4, mbs=1, accum=2)
    for step in range(8):
        ref = sorted(one.step(step).items)
        assert sorted(x for r in range(2) for x in two.step(step, r).items) == ref
        assert sorted(x for r in range(4) for x in four.step(step, r).items) == ref
        # ranks never share a unit within a step
        assert len({x for r in range(2) for x in two.step(step, r).items}) == 8


def test_order_depends_only_on_seed_and_step():
    import random

    a, b = make(seed=3), make(seed=3)
    random.seed(123)  # global RNG state must not matter (resume restores it, but data order never reads it)
    first = [a.step(s).items for s in range(5)]
    random.seed(999)
    assert [b.step(s).items for s in reversed(range(5))][::-1] == first
    assert make(seed=4).step(0).items != first[0]
    assert a.signature() != make(mbs=4, accum=1).signature()  # same global batch, other shape: resume refuses


def test_bins_are_units_one_row_each():
    units = [[0, 1], [2], [3, 4, 5], [6], [7, 8], [9]]
    b = Batcher(list("abcdefghij"), units, 2, 1, 1, 0)
    assert b.steps_per_epoch == 3
    rows = [row for s in range(3) for mb in b.step(s).micro for row in mb.rows]
    assert sorted(map(tuple, rows)) == sorted(tuple("abcdefghij"[i] for i in u) for u in units)


@pytest.mark.parametrize("n,world,mbs", [(10, 3, 2), (7, 2, 4), (1, 4, 1), (12, 2, 3)])
def test_eval_shards_cover_each_item_once_with_equal_forward_counts(n, world, mbs):
    shards = [eval_batches(list(range(n)), mbs, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of forwards
    counted = [x for s in shards for mb in s if not mb.dummy for x in mb.items]
    assert sorted(counted) == list(range(n))
    assert eval_batches([], 2, 0, 2) == []


def test_group_by_length_fills_steps_with_similar_lengths_and_stays_resumable():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]  # items are their own lengths
    grouped = Batcher(lengths, None, 2, 2, 1, 7, length=lambda x: x)
    plain = Batcher(lengths, None, 2, 2, 1, 7)
    assert grouped.signature() != plain.signature()  # a resume may not switch it on or off
    spread = lambda b: sum(max(b.step(s).items) - min(b.step(s).items) for s in range(100)) / 100  # noqa: E731
    assert spread(grouped) < 0.2 * spread(plain)  # each step's lengths lie close together
    epoch = [x for s in range(100) for x in grouped.step(s).items]
    assert sorted(epoch) == sorted(lengths)  # still every unit once per epoch
    again = Batcher(lengths, None, 2, 2, 1, 7, length=lambda x: x)
    assert [again.step(s).items for s in (3, 57, 120)] == [grouped.step(s).items for s in (3, 57, 120)]  # (seed, step) only
    two = Batcher(lengths, None, 1, 2, 2, 7, length=lambda x: x)  # same global batch on 2 processes
    assert all(sorted(two.step(s, 0).items + two.step(s, 1).items) == sorted(grouped.step(s).items) for s in range(20))
