"""KTO on the shared loop: unpaired examples (KTO rows, or each pair's chosen as desirable and rejected as
undesirable); the reference point is the step's KL estimate on mismatched (prompt, completion) pairs.

Batch: collated examples plus, under "kl", each example's prompt with its partner's completion (the item
before it, fixed per item so reference values can be precomputed). Before the step's first backward the
KL reference point z0 = E[log pi/pi_ref] is estimated over the whole step (all micro-batches, all
processes), clamped at 0, without gradient. Eval: held-out pairs, as for DPO, at KL 0.
"""

from __future__ import annotations

import torch

from tuneforge.train.recipes import pairs
from tuneforge.train.recipes.preference import PairLoss, kto_loss
from tuneforge.train.recipes.reference import Reference


class KTORecipe:
    name = "kto"
    unit = "examples"
    items_name = "examples"

    def batcher(self, ctx):
        from tuneforge.data.preference import Pair, pairs_to_unpaired

        self.ctx = ctx
        rows = [x for x in ctx.data.pairs if not isinstance(x, Pair)]  # KTO rows: messages + label
        self.items = rows + pairs_to_unpaired(pairs.only_pairs(ctx.data.pairs))
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

    # ---- batch ---------------------------------------------------------------------------------------
    def collate(self, micro, split: str = "train") -> dict:
        ctx = self.ctx
        if split == "eval":  # held-out pairs: accuracy of the implicit reward, as for DPO
            return pairs.collate_referenced_pairs(ctx, micro, split, self.ref, self.packed)
        units = micro.units or [0]
        partners = [self.items[(u - 1) % len(self.items)] for u in units]
        batch = pairs.collate_unpaired(micro.items, ctx.tokenizer.pad_token_id, self.packed, partners)
        ref = self.ref.values("train", units)
        if ref is not None:
            batch["ref_logps"], batch["kl"]["ref_logps"] = torch.tensor([r[0] for r in ref]), torch.tensor([r[1] for r in ref])
        return pairs.to_device(batch, ctx.accel.device)

    def reference_rows(self, batch: dict) -> torch.Tensor:
        if "kl" not in batch:  # eval pairs
            return pairs.reference_pair_rows(self.ref, batch)
        return torch.stack([self.ref.logps(batch), self.ref.logps(batch["kl"])], dim=1)

    def batches(self, sb) -> list[dict]:
        batches = [self.collate(mb) for mb in sb.micro]
        self.kl = self.kl_estimate(batches)
        return batches

    def kl_estimate(self, batches: list[dict]) -> torch.Tensor:
        accel = self.ctx.accel
        local = torch.zeros(2, dtype=torch.float64, device=accel.device)
        with torch.no_grad():
            for b in batches:
                with accel.autocast():
                    ratio = pairs.sequence_logps(pairs.forward(self.ctx.model, b["kl"]), b["kl"])[0] - self.ref.logps(b["kl"])
                local += torch.stack([ratio.double().sum(), torch.tensor(float(len(ratio)), dtype=torch.float64, device=local.device)])
        total, n = accel.reduce(local, reduction="sum").tolist()
        return torch.tensor(max(total / n, 0.0) if n else 0.0, device=accel.device)

    count = staticmethod(pairs.count)
    tokens = staticmethod(pairs.real_tokens)

    # ---- loss ----------------------------------------------------------------------------------------
    def loss(self, model, batch):
        p = self.ctx.cfg.preference
        logps, _ = pairs.sequence_logps(pairs.forward(model, batch), batch)
        desirable = batch["desirable"]
        out = kto_loss(logps, self.ref.logps(batch), desirable, self.kl, self.beta, p.desirable_weight, p.undesirable_weight)
        d = desirable.float()
        metrics = {"_rewards_chosen": out.chosen_rewards.sum(), "_rewards_rejected": out.rejected_rewards.sum(),
                   "_logps_chosen": (logps.detach() * d).sum(), "_logps_rejected": (logps.detach() * (1 - d)).sum(),
                   "_desirable": d.sum(), "kl": self.kl * len(d)}
        return out.losses.sum(), metrics

    def step_metrics(self, m: dict) -> dict:
        """The loop divided every sum by the examples; rewards and log-probs are means over their own side."""
        n = m.pop("examples")
        des = m.pop("_desirable") * n
        m["examples"] = n
        m["rewards_chosen"] = m.pop("_rewards_chosen") * n / max(des, 1)
        m["rewards_rejected"] = m.pop("_rewards_rejected") * n / max(n - des, 1)
        m["logps_chosen"] = m.pop("_logps_chosen") * n / max(des, 1)
        m["logps_rejected"] = m.pop("_logps_rejected") * n / max(n - des, 1)
        m["reward_margin"] = m["rewards_chosen"] - m["rewards_rejected"]
        return m

    # ---- eval ----------------------------------------------------------------------------------------
    def eval_loss(self, model, batch):
        """Held-out pairs: the KTO loss of chosen (desirable) and rejected (undesirable) at KL 0, and the
        implicit rewards' accuracy and margin, as for DPO."""
        p = self.ctx.cfg.preference
        logps, _ = pairs.sequence_logps(pairs.forward(model, batch), batch)
        n = self.count(batch)
        desirable = torch.arange(2 * n, device=logps.device) < n
        kto = kto_loss(logps, self.ref.logps(batch), desirable, torch.zeros((), device=logps.device), self.beta,
                       p.desirable_weight, p.undesirable_weight)
        out = PairLoss(kto.losses, kto.chosen_rewards, kto.rejected_rewards)
        return kto.losses.sum() / 2, pairs.pair_metrics(out, logps[:n], logps[n:])

    def evaluate(self) -> dict:
        return pairs.evaluate(self.ctx, self.eval_items, self.collate, self.eval_loss)

    def summary(self, last: dict) -> dict:
        return pairs.summary(last, self.before)

    def run_info(self) -> dict:
        return {"method": self.name, "reference": self.ref.kind}

    def parity_samples(self) -> list[list[int]]:
        return pairs.parity_ids(self.eval_items or self.items)
