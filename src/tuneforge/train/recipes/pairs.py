"""What the preference recipes (dpo, orpo, simpo, kto) share, as plain functions: items, batches of pairs,
sequence log-probs, metrics and the held-out evaluation over pairs.

Batch: a micro-batch of pairs becomes one forward over [chosen_1..chosen_B, rejected_1..rejected_B]
(padded rows, or one packed row with padding_free), with `seq` giving each target token's sequence, so
a sequence's log-prob is one scatter-add. Losses are train/recipes/preference.py's pure functions, summed
over pairs; the loop divides by the pairs of the whole step (all micro-batches, all processes).
"""

from __future__ import annotations

from typing import Callable

import torch

from tuneforge.data.collate import shifted_targets
from tuneforge.data.render import IGNORE
from tuneforge.errors import UserError
from tuneforge.train.core.step import to_device  # the recipes' collates call it as pairs.to_device
from tuneforge.train.recipes.preference import token_logps

DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "kto": 0.1}


# ---- items ---------------------------------------------------------------------------------------------


def beta(cfg, method: str) -> float:
    return cfg.preference.beta or DEFAULT_BETA.get(method, 0.1)


def only_pairs(items: list) -> list:
    from tuneforge.data.preference import Pair

    return [x for x in items if isinstance(x, Pair)]


def train_pairs(data, method: str) -> list:
    """The data's preference pairs; KTO rows (messages + label) are refused: they have no rejected side."""
    if len(only_pairs(data.pairs)) != len(data.pairs):
        raise UserError(f"train.method {method}: the data holds KTO rows (messages + label); they train with train.method: kto")
    return data.pairs


def batcher(ctx, items: list, method: str):
    """Deal `items` (pairs, or KTO examples) out to steps; refuse data without any."""
    from tuneforge.data.batcher import Batcher

    t = ctx.cfg.train
    if not items:
        raise UserError(f"train.method {method} needs preference pairs (prompt + chosen/rejected) but the data holds none "
                        f"({len(ctx.data.train)} SFT samples): use preference data, or train.method: sft")
    if ctx.data.train:
        ctx.log(f"{method}: the data's {len(ctx.data.train)} SFT samples are not used")
    return Batcher(items, None, t.micro_batch_size, t.grad_accum, ctx.accel.num_processes, t.seed,
                   length=tokens_of if t.group_by_length else None)


def tokens_of(item) -> int:
    """A pair's tokens (chosen + rejected), or a KTO example's."""
    return len(item.chosen.input_ids) + len(item.rejected.input_ids) if hasattr(item, "chosen") else len(item.encoded.input_ids)


def parity_ids(items: list) -> list[list[int]]:
    """`merge` checks parity on these: chosen sequences (or KTO completions) stand in for SFT samples."""
    return [(p.chosen if hasattr(p, "chosen") else p.encoded).input_ids for p in items[:4]]


# ---- batch ---------------------------------------------------------------------------------------------


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
    """B pairs -> 2B sequences: chosen first, then rejected (the order every loss assumes)."""
    return {**collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, packed), "n_pairs": torch.tensor(len(pairs))}


def collate_referenced_pairs(ctx, micro, split: str, ref, packed: bool) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs on the device, with their precomputed reference log-probs (chosen, then rejected)
    when `ref` (train/recipes/reference.py) holds them."""
    batch = collate_pairs(micro.items, ctx.tokenizer.pad_token_id, packed)
    values = ref.values(split, micro.units)
    if values is not None:
        batch["ref_logps"] = torch.tensor([r[0] for r in values] + [r[1] for r in values])
    return to_device(batch, ctx.accel.device)


def reference_pair_rows(ref, batch: dict) -> torch.Tensor:
    """(pairs, 2) reference log-probs of a collated batch of pairs: what `ref.precompute` keeps per pair."""
    logps, n = ref.logps(batch), count(batch)
    return torch.stack([logps[:n], logps[n:]], dim=1)


def collate_unpaired(examples: list, pad_id: int, packed: bool, partners: list | None = None) -> dict[str, torch.Tensor]:
    """KTO: B examples, and under "kl" B mismatched sequences (prompt i + the completion of partners[i];
    default: of example i-1, as TRL) for the KL reference point."""
    from tuneforge.data.preference import Unpaired

    partners = partners if partners is not None else [examples[i - 1] for i in range(len(examples))]
    shifted = [Unpaired(e.prompt, e.prompt_ids, q.completion, e.desirable).encoded for e, q in zip(examples, partners)]
    batch = collate_sequences([e.encoded for e in examples], pad_id, packed)
    # The KL sequences only need a no-grad forward: a batch of their own, not rows of the trained one.
    return {**batch, "desirable": torch.tensor([e.desirable for e in examples]), "n_pairs": torch.tensor(len(examples)),
            "kl": collate_sequences(shifted, pad_id, packed)}


def count(batch) -> int:
    return int(batch["n_pairs"])


def real_tokens(batch) -> int:
    return int(batch["real_tokens"])


def chosen_tokens(batch: dict) -> int:
    n = int(batch["n_pairs"])
    return int(((batch["seq"] >= 0) & (batch["seq"] < n)).sum())


# ---- log-probs and metrics -------------------------------------------------------------------------------


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


def pair_metrics(out, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed over pairs (the loop divides by the pair count): rewards, margin, accuracy, log-probs."""
    margin = out.chosen_rewards - out.rejected_rewards
    return {"rewards_chosen": out.chosen_rewards.sum(), "rewards_rejected": out.rejected_rewards.sum(),
            "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).float().sum(),
            "logps_chosen": chosen_logps.detach().sum(), "logps_rejected": rejected_logps.detach().sum()}


# ---- held-out pairs --------------------------------------------------------------------------------------

EVAL_KEYS = ("loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected")


def evaluate(ctx, items: list, collate: Callable, loss: Callable, before: Callable | None = None) -> dict:
    """Loss, reward accuracy, margin and rewards over the held-out pairs, sharded across processes ->
    {"eval_loss": ..., "eval_reward_accuracy": ...}; {} without held-out pairs. `before(batches)` computes
    what the loss needs from all batches first (ORPO's token count). The forwards run under step.eval_mode
    (no dropout; 4-bit CPU layers are not repacked)."""
    from tuneforge.data.batcher import eval_batches
    from tuneforge.train.core.step import eval_mode

    if not items:
        return {}
    accel = ctx.accel
    mine = eval_batches(items, ctx.eval_batch_size, accel.process_index, accel.num_processes)
    batches = [(collate(mb, "eval"), mb.dummy) for mb in mine]
    if before:
        before([b for b, _ in batches])
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad(), eval_mode(ctx.model):
        for batch, dummy in batches:
            with accel.autocast():
                loss_sum, metrics = loss(ctx.model, batch)
            if dummy:
                continue
            for k, v in {"loss": loss_sum, **metrics, "n": torch.tensor(float(count(batch)))}.items():
                sums[k] = sums.get(k, 0) + v.detach().double().to(accel.device)
    keys = [*EVAL_KEYS, "n"]
    local = torch.stack([sums.get(k, torch.zeros((), dtype=torch.float64, device=accel.device)) for k in keys])
    total = dict(zip(keys, accel.reduce(local, reduction="sum").tolist()))
    n = max(total.pop("n"), 1)
    return {f"eval_{k}": v / n for k, v in total.items()}


def evaluate_before(ctx, method: str, evaluate: Callable) -> dict:
    """The held-out metrics before the first step (a resumed run has no "before")."""
    if ctx.start_step:
        return {}
    before = evaluate()
    if before:
        ctx.log(f"{method}: held-out reward accuracy before training {before['eval_reward_accuracy']:.3f}")
    return before


def summary(last: dict, before: dict) -> dict:
    """The last step's rewards/log-probs/KL and the held-out metrics before training (`*_before`)."""
    return {**{k: v for k, v in last.items() if k.startswith(("reward", "logps", "kl"))},
            **{f"{k}_before": v for k, v in before.items()}}
