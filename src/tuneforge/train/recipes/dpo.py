"""DPO on the shared loop: pairs in, the DPO loss against a reference out.

Batch: collated pairs (train/recipes/pairs.py), with the reference log-probs attached when precomputed.
Loss: preference.dpo_loss (sigmoid / robust / hinge / ipo) summed over pairs; the loop divides by the
pairs of the whole step. Metrics: rewards, margin, accuracy, log-probs. Eval: the same over held-out pairs.
"""

from __future__ import annotations

import torch

from tuneforge.train.recipes import pairs
from tuneforge.train.recipes.preference import dpo_loss
from tuneforge.train.recipes.reference import Reference


class DPORecipe:
    name = "dpo"
    unit = "pairs"
    items_name = "pairs"

    def batcher(self, ctx):
        self.ctx = ctx
        self.items = pairs.train_pairs(ctx.data, self.name)
        self.eval_items = pairs.only_pairs(ctx.data.eval_pairs)
        self.beta = pairs.beta(ctx.cfg, self.name)
        self.packed = ctx.cfg.data.packing != "off"
        return pairs.batcher(ctx, self.items, self.name)

    def setup(self, ctx) -> None:
        self.ref = Reference(ctx, self.name)
        if self.ref.kind == "precomputed":
            self.ref.precompute({"train": self.items, "eval": self.eval_items}, self.collate, self.reference_rows)
        ctx.log(f"{self.name}: reference = {self.ref.kind}")
        self.before = pairs.evaluate_before(ctx, self.name, self.evaluate)

    def collate(self, micro, split: str = "train") -> dict:
        return pairs.collate_referenced_pairs(self.ctx, micro, split, self.ref, self.packed)

    def reference_rows(self, batch: dict) -> torch.Tensor:
        return pairs.reference_pair_rows(self.ref, batch)

    def batches(self, sb) -> list[dict]:
        return [self.collate(mb) for mb in sb.micro]

    count = staticmethod(pairs.count)
    tokens = staticmethod(pairs.real_tokens)

    def loss(self, model, batch):
        p = self.ctx.cfg.preference
        logps, counts = pairs.sequence_logps(pairs.forward(model, batch), batch)
        ref = self.ref.logps(batch)
        n = self.count(batch)
        out = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta, p.loss_type, p.label_smoothing, counts[:n], counts[n:])
        return out.losses.sum(), pairs.pair_metrics(out, logps[:n], logps[n:])

    def evaluate(self) -> dict:
        return pairs.evaluate(self.ctx, self.eval_items, self.collate, self.loss)

    def summary(self, last: dict) -> dict:
        return pairs.summary(last, self.before)

    def run_info(self) -> dict:
        return {"method": self.name, "reference": self.ref.kind}

    def parity_samples(self) -> list[list[int]]:
        return pairs.parity_ids(self.eval_items or self.items)
