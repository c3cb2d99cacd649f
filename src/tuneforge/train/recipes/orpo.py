"""ORPO on the shared loop: reference-free; loss = NLL of the chosen completions + lambda * odds-ratio term.

Batch: collated pairs (train/recipes/pairs.py); before the step's first backward, the chosen tokens of the
whole step (all micro-batches, all processes) are counted: the NLL is per chosen token, the odds-ratio term
per pair, and the loop divides by pairs, so the NLL sum is pre-scaled by pairs / chosen tokens.
"""

from __future__ import annotations

import torch

from tuneforge.train.recipes import pairs
from tuneforge.train.recipes.preference import orpo_log_odds, orpo_loss


class ORPORecipe:
    name = "orpo"
    unit = "pairs"
    items_name = "pairs"

    def batcher(self, ctx):
        self.ctx = ctx
        self.items = pairs.train_pairs(ctx.data, self.name)
        self.eval_items = pairs.only_pairs(ctx.data.eval_pairs)
        self.packed = ctx.cfg.data.packing != "off"
        return pairs.batcher(ctx, self.items, self.name)

    def setup(self, ctx) -> None:
        self.before = pairs.evaluate_before(ctx, self.name, self.evaluate)

    def collate(self, micro, split: str = "train") -> dict:
        return pairs.to_device(pairs.collate_pairs(micro.items, self.ctx.tokenizer.pad_token_id, self.packed), self.ctx.accel.device)

    def batches(self, sb) -> list[dict]:
        batches = [self.collate(mb) for mb in sb.micro]
        self.scale_nll(batches)
        return batches

    def scale_nll(self, batches: list[dict]) -> None:
        local = torch.tensor([sum(self.count(b) for b in batches), sum(pairs.chosen_tokens(b) for b in batches)],
                             dtype=torch.float64, device=self.ctx.accel.device)
        n_pairs, n_tokens = self.ctx.accel.reduce(local, reduction="sum").tolist()
        self.nll_scale = n_pairs / max(n_tokens, 1)

    count = staticmethod(pairs.count)
    tokens = staticmethod(pairs.real_tokens)

    def loss(self, model, batch):
        logps, counts = pairs.sequence_logps(pairs.forward(model, batch), batch)
        n = self.count(batch)
        avg = logps / counts.clamp(min=1)
        out = orpo_loss(avg[:n], avg[n:], self.ctx.cfg.preference.orpo_lambda)
        nll = -logps[:n].sum() * self.nll_scale
        metrics = {**pairs.pair_metrics(out, logps[:n], logps[n:]), "nll_loss": nll.detach(),
                   "log_odds_chosen": orpo_log_odds(avg[:n], avg[n:]).sum()}
        return out.losses.sum() + nll, metrics

    def evaluate(self) -> dict:
        return pairs.evaluate(self.ctx, self.eval_items, self.collate, self.loss, before=self.scale_nll)

    def summary(self, last: dict) -> dict:
        return pairs.summary(last, self.before)

    def run_info(self) -> dict:
        return {"method": self.name, "reference": None}

    def parity_samples(self) -> list[list[int]]:
        return pairs.parity_ids(self.eval_items or self.items)
