"""SimPO on the shared loop: reference-free, length-normalised log-probs with a target margin gamma.

Batch: collated pairs (train/recipes/pairs.py). Loss: preference.simpo_loss on mean per-token log-probs,
summed over pairs; the loop divides by the pairs of the whole step.
"""

from __future__ import annotations

from tuneforge.train.recipes import pairs
from tuneforge.train.recipes.preference import simpo_loss


class SimPORecipe:
    name = "simpo"
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
        self.before = pairs.evaluate_before(ctx, self.name, self.evaluate)

    def collate(self, micro, split: str = "train") -> dict:
        return pairs.to_device(pairs.collate_pairs(micro.items, self.ctx.tokenizer.pad_token_id, self.packed), self.ctx.accel.device)

    def batches(self, sb) -> list[dict]:
        return [self.collate(mb) for mb in sb.micro]

    count = staticmethod(pairs.count)
    tokens = staticmethod(pairs.real_tokens)

    def loss(self, model, batch):
        p = self.ctx.cfg.preference
        logps, counts = pairs.sequence_logps(pairs.forward(model, batch), batch)
        n = self.count(batch)
        avg = logps / counts.clamp(min=1)
        out = simpo_loss(avg[:n], avg[n:], self.beta, p.simpo_gamma, p.label_smoothing)
        return out.losses.sum(), pairs.pair_metrics(out, logps[:n], logps[n:])

    def evaluate(self) -> dict:
        return pairs.evaluate(self.ctx, self.eval_items, self.collate, self.loss)

    def summary(self, last: dict) -> dict:
        return pairs.summary(last, self.before)

    def run_info(self) -> dict:
        return {"method": self.name, "reference": None}

    def parity_samples(self) -> list[list[int]]:
        return pairs.parity_ids(self.eval_items or self.items)
