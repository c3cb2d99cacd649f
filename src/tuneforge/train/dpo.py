"""Preference recipes on the training core: DPO, ORPO, SimPO and KTO. Each is its batch, its loss and its
metrics; the loop, data order, checkpoints and run directory are SFT's (train/sft.py, train/step.py).

Batch: a micro-batch of pairs becomes one forward over [chosen_1..chosen_B, rejected_1..rejected_B]
(padded rows, or one packed row with padding_free), with `seq` giving each target token's sequence, so
a sequence's log-prob is one scatter-add. Loss: train/preference.py's pure functions, summed over
pairs; the core divides by the pairs of the whole step (all micro-batches, all processes).
"""

from __future__ import annotations

import torch

from tuneforge.data.collate import shifted_targets
from tuneforge.data.render import IGNORE
from tuneforge.train.preference import token_logps

DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "kto": 0.1}


# ---- batch -------------------------------------------------------------------------------------------


def collate_sequences(seqs: list, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Encoded sequences (input_ids, labels) -> model inputs + pre-shifted targets + `seq`: (R, T) index of
    the sequence each target belongs to (-1: none). packed: one row, positions restart per sequence."""
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    if packed:
        ids, targets, pos, seq = [], [], [], []
        for k, s in enumerate(seqs):
            tg = shifted_targets(s.labels)
            ids += s.input_ids
            targets += tg
            pos += range(len(s.input_ids))
            seq += [k if x != IGNORE else -1 for x in tg]
        return {"input_ids": t([ids]), "targets": t([targets]), "position_ids": t([pos]), "seq": t([seq]),
                "real_tokens": torch.tensor(len(ids)), "n_seqs": torch.tensor(len(seqs))}
    width = max(len(s.input_ids) for s in seqs)
    ids, targets, mask, seq = [], [], [], []
    for k, s in enumerate(seqs):
        n, fill = len(s.input_ids), width - len(s.input_ids)
        tg = shifted_targets(s.labels) + [IGNORE] * fill
        ids.append(s.input_ids + [pad_id] * fill)
        targets.append(tg)
        mask.append([1] * n + [0] * fill)
        seq.append([k if x != IGNORE else -1 for x in tg])
    return {"input_ids": t(ids), "targets": t(targets), "attention_mask": t(mask), "seq": t(seq),
            "real_tokens": torch.tensor(sum(map(sum, mask))), "n_seqs": torch.tensor(len(seqs))}


def collate_pairs(pairs: list, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """B pairs -> 2B sequences: chosen first, then rejected (the order every loss below assumes)."""
    return {**collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, packed), "n_pairs": torch.tensor(len(pairs))}


def collate_unpaired(examples: list, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """KTO: B examples + B mismatched ones (prompt i with completion i-1, as TRL) for the KL reference point."""
    from tuneforge.data.preference import Unpaired

    shifted = [Unpaired(e.prompt, e.prompt_ids, examples[i - 1].completion, e.desirable).encoded for i, e in enumerate(examples)]
    batch = collate_sequences([e.encoded for e in examples], pad_id, packed)
    # The KL sequences only need a no-grad forward: a batch of their own, not rows of the trained one.
    return {**batch, "desirable": torch.tensor([e.desirable for e in examples]), "n_pairs": torch.tensor(len(examples)),
            "kl": collate_sequences(shifted, pad_id, packed)}


def forward(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # use_cache=False: with a cache, packed rows (restarting position_ids) attend across sequences.
    return model(**inputs, use_cache=False).logits


def sequence_logps(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (summed log-prob of each sequence's trained tokens (N,), trained token count (N,))."""
    per_token = token_logps(logits, batch["targets"]).flatten()
    seq = batch["seq"].flatten()
    keep = seq >= 0
    n = int(batch["n_seqs"])
    sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, seq[keep], per_token[keep])
    counts = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, seq[keep], torch.ones_like(per_token[keep]))
    return sums, counts
