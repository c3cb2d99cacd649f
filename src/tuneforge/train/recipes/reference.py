"""The reference model of DPO and KTO (and any recipe that compares with the base model), as one small
object a recipe holds:

    adapter_disabled   LoRA: the base model is the policy with its adapter switched off (no second copy)
    frozen_copy        a second, frozen copy of the base model
    precomputed        reference log-probs of every item, computed once and cached beside the prepared data
                       (keyed by the data fingerprint and the base model's files), so a resume reads them back
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from tuneforge.errors import UserError
from tuneforge.train.recipes.pairs import forward, sequence_logps


class Reference:
    def __init__(self, ctx, method: str):
        self.ctx, self.method = ctx, method
        self.model = None  # frozen_copy
        self.cache: dict | None = None  # precomputed: {split: [per item: its reference values]}
        choice = ctx.cfg.preference.reference
        if choice == "auto":
            choice = "adapter_disabled" if self._is_peft() else "frozen_copy"
        if choice == "adapter_disabled" and not self._is_peft():
            raise UserError("preference.reference: adapter_disabled needs a LoRA model (train.finetune: lora)")
        self.kind = choice
        if choice == "frozen_copy":
            self.model = ctx.accel.prepare_model(self._load(), evaluation_mode=True)

    def _is_peft(self) -> bool:
        return hasattr(self.ctx.plain_model, "disable_adapter")

    def _load(self):
        from tuneforge.model.adapters import resize_embeddings
        from tuneforge.model.load import load_model

        ref = load_model(self.ctx.source, self.ctx.cfg.model)
        resize_embeddings(ref, self.ctx.tokenizer)  # same rows as the policy got
        return ref.requires_grad_(False).eval()

    @contextmanager
    def active(self):
        """The model that computes reference values: the policy with its adapter off, or the frozen copy."""
        if self.kind == "adapter_disabled":
            model = self.ctx.plain_model
            with model.disable_adapter():
                yield model
        else:
            yield self.model

    def logps(self, batch: dict) -> torch.Tensor:
        """Summed log-probs of the batch's sequences under the reference (no gradient)."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad(), self.active() as model:
            return sequence_logps(forward(model, batch), batch)[0]

    def values(self, split: str, units: list[int]) -> list | None:
        """The precomputed values of these items (None unless precomputed). A dummy eval batch has no units."""
        if self.kind != "precomputed":
            return None
        return [self.cache[split][u] for u in (units or [0])]

    # ---- precomputed -------------------------------------------------------------------------------------
    def precompute(self, splits: dict[str, list], collate: Callable, rows: Callable) -> None:
        """Fill the cache for every split's items: `collate(micro, split)` -> batch, `rows(batch)` -> (B, 2)
        reference values. Read back from disk when an earlier run (or this one, before a resume) wrote it."""
        from tuneforge.data.prepare import cache_path
        from tuneforge.train.core.step import eval_mode

        ctx = self.ctx
        path = cache_path(ctx.cfg.data, ctx.data.fingerprint) / f"reference-{self.method}-{self._key()}.json"
        if path.is_file():
            ctx.log(f"{self.method}: reference log-probs from {path}")
            self.cache = json.loads(path.read_text())
            return
        self.kind = "adapter_disabled" if self._is_peft() else "frozen_copy"
        fresh = self.kind == "frozen_copy" and ctx.start_step > 0  # resumed: the live weights are no longer the base
        self.model = ctx.accel.prepare_model(self._load(), evaluation_mode=True) if fresh else ctx.model
        with eval_mode(ctx.model):
            cache = {split: self._values(items, split, collate, rows) for split, items in splits.items()}
        self.kind, self.model, self.cache = "precomputed", None, cache
        if ctx.accel.is_main_process:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(path)
        ctx.log(f"{self.method}: reference log-probs computed once for {len(cache['train'])} + {len(cache['eval'])} items -> {path}")

    def _values(self, items: list, split: str, collate: Callable, rows: Callable) -> list:
        """[per item: its reference values] over all ranks (each computes its shard; ZeRO-3 needs all in every forward)."""
        from tuneforge.data.batcher import eval_batches

        accel = self.ctx.accel
        rank, world, mbs = accel.process_index, accel.num_processes, self.ctx.eval_batch_size
        out_rows = []
        for mb in eval_batches(items, mbs, rank, world):
            values = rows(collate(mb, split))  # (B, k)
            ids = torch.tensor(mb.units if not mb.dummy else [-1] * len(values), dtype=values.dtype, device=values.device)
            out_rows.append(torch.cat([ids[:, None], values], dim=1))
        width = 3  # item index, two reference values
        local = torch.cat(out_rows) if out_rows else torch.zeros(0, width, device=accel.device)
        local = torch.cat([local, torch.full((mbs * len(out_rows) - len(local), width), -1.0, device=local.device)]) if out_rows else local
        gathered = accel.gather(local.double()).tolist()
        out = [None] * len(items)
        for idx, *vals in gathered:
            if idx >= 0:
                out[int(idx)] = vals
        return out

    def _key(self) -> str:
        h = hashlib.sha256(json.dumps(self.ctx.cfg.model.model_dump(), sort_keys=True, default=str).encode())
        src = Path(self.ctx.source)
        for f in sorted(src.glob("*")) if src.is_dir() else [src]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:12]
