"""Supervised fine-tuning on the shared loop (train/core/loop.py).

Its batches are collated SFT samples (padded rows, bins, or one padding-free row); its loss is the summed
masked cross-entropy (label smoothing while training), normalised by the target tokens of the whole step
across micro-batches and processes; its eval is the plain cross-entropy per target token of the eval split.
"""

from __future__ import annotations

from tuneforge.errors import UserError


class SFTRecipe:
    name = "sft"
    unit = "target_tokens"
    items_name = "samples"

    def batcher(self, ctx):
        from tuneforge.data.batcher import Batcher

        self.ctx = ctx
        cfg, t, data = ctx.cfg, ctx.cfg.train, ctx.data
        if not data.train:
            raise UserError(f"the data holds {len(data.pairs) + len(data.eval_pairs)} preference pairs / KTO rows and no "
                            "SFT samples: set train.method: dpo (or orpo, simpo, kto) to train on them")
        self.packed = cfg.data.packing != "off"
        self.layout = "packed" if cfg.data.packing == "padding_free" else "rows"
        return Batcher(data.train, data.units, t.micro_batch_size, t.grad_accum, ctx.accel.num_processes, t.seed, layout=self.layout,
                       length=len if t.group_by_length else None)

    def setup(self, ctx) -> None:
        """Nothing beyond the model: SFT needs no reference."""

    def collate(self, micro) -> dict:
        from tuneforge.data.collate import collate
        from tuneforge.train.core.step import to_device

        return to_device(collate(micro.rows, self.ctx.tokenizer.pad_token_id, self.packed), self.ctx.accel.device)

    def batches(self, sb) -> list[dict]:
        return [self.collate(mb) for mb in sb.micro]

    def loss(self, model, batch, label_smoothing: float | None = None):
        """Summed masked cross-entropy (label smoothing while training; eval passes 0: the plain CE)."""
        from tuneforge.train.core.loss import token_loss

        t = self.ctx.cfg.train
        return token_loss(model, batch, t.loss_kernel, t.label_smoothing if label_smoothing is None else label_smoothing)

    @staticmethod
    def count(batch) -> int:
        from tuneforge.train.core.loss import count_targets

        return count_targets(batch)

    def evaluate(self) -> dict:
        """Cross-entropy per target token over the whole eval split, sharded across processes."""
        from tuneforge.data.batcher import eval_batches
        from tuneforge.train.core.step import evaluate

        ctx = self.ctx
        if not ctx.data.eval:
            return {}
        mine = eval_batches(ctx.data.eval, ctx.eval_batch_size, ctx.accel.process_index, ctx.accel.num_processes, layout=self.layout)
        plain_ce = lambda model, batch: self.loss(model, batch, label_smoothing=0.0)  # noqa: E731
        return {"eval_loss": evaluate(ctx.accel, ctx.model, [(self.collate(mb), mb.dummy) for mb in mine], plain_ce, self.count)}
