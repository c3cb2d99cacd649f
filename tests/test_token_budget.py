"""Token-budget batching (train.micro_batch_tokens): micro-batches hold up to N tokens of whole samples,
padding-free, and a step's loss is exactly the loss of the same samples unpacked."""

import pytest
import torch

import tiny
from test_invariants import recipe
from tuneforge.config.load import validate
from tuneforge.data.collate import collate
from tuneforge.errors import UserError
from tuneforge.train.core.loss import count_targets, forward_logits, summed_ce

BASE = {"model": {"path": "m"}, "data": {"train": [{"path": "t.jsonl"}], "max_length": 64}}


def test_budget_expands_to_one_bin_per_micro_batch():
    cfg = validate({**BASE, "train": {"micro_batch_tokens": 256}})
    assert (cfg.data.packing, cfg.data.pack_length, cfg.data.bin_tokens, cfg.train.micro_batch_size) == ("bins", 256, 256, 1)


@pytest.mark.parametrize("train, data, needle", [
    ({"micro_batch_tokens": 256, "micro_batch_size": 4}, {}, "replaces train.micro_batch_size"),
    ({"micro_batch_tokens": 32}, {}, "must hold the longest sample (data.max_length = 64)"),
    ({"micro_batch_tokens": 256}, {"packing": "off"}, "cannot be used with data.packing: off"),
    ({"micro_batch_tokens": 256}, {"packing": "bins", "pack_length": 128}, "remove data.pack_length"),
])
def test_budget_conflicts_are_one_line(train, data, needle):
    with pytest.raises(UserError) as err:
        validate({**BASE, "data": {**BASE["data"], **data}, "train": train})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_budget_step_loss_equals_unpacked_loss(tmp_path, llama_dir):
    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(40, seed=4))
    r = recipe(tmp_path, llama_dir, train_file, "budget", data={"max_length": 48}, micro_batch_tokens=96, grad_accum=2)
    sb = r.batcher.step(0)
    rows = [row for mb in sb.micro for row in mb.rows]
    assert len(sb.micro) == 2 and all(len(mb.rows) == 1 for mb in sb.micro)  # one padding-free row per micro-batch
    assert all(sum(len(s) for s in row) <= 96 for row in rows)
    assert sum(len(row) for row in rows) > 2  # several whole samples per row
    m = r.backward_step(0)
    samples = [s for row in rows for s in row]
    with torch.no_grad():
        b = collate([samples], r.tokenizer.pad_token_id, packed=False)
        unpacked = summed_ce(forward_logits(r.model, b), b["targets"]).item() / count_targets(b)
    assert m["target_tokens"] == count_targets(b)
    assert abs(m["loss"] - unpacked) <= 1e-4
