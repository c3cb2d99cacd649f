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
from tuneforge.errors import UserError
from tuneforge.train import preference as pl
from tuneforge.train.preference import token_logps
from tuneforge.train.sft import SFTRecipe

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


def _to_device(batch: dict, device) -> dict:
    return {k: _to_device(v, device) if isinstance(v, dict) else v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _pair_metrics(out, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed over pairs (the core divides by the pair count): rewards, margin, accuracy, log-probs."""
    margin = out.chosen_rewards - out.rejected_rewards
    return {"rewards_chosen": out.chosen_rewards.sum(), "rewards_rejected": out.rejected_rewards.sum(),
            "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).float().sum(),
            "logps_chosen": chosen_logps.detach().sum(), "logps_rejected": rejected_logps.detach().sum()}


# ---- recipes ------------------------------------------------------------------------------------------


class DPORecipe(SFTRecipe):
    """DPO. Batch: pairs; loss: dpo_loss against a reference; metrics: rewards, margin, accuracy, log-probs."""

    name = "dpo"
    uses_reference = True

    # ---- items and batch --------------------------------------------------------------------------
    def train_items(self) -> list:
        from tuneforge.data.preference import Pair

        if any(not isinstance(x, Pair) for x in self.data.pairs):
            raise UserError(f"train.method {self.name}: the data holds KTO rows (messages + label); they train with train.method: kto")
        return self.data.pairs

    def eval_items(self) -> list:
        from tuneforge.data.preference import Pair

        return [x for x in self.data.eval_pairs if isinstance(x, Pair)]

    def make_batcher(self):
        from tuneforge.data.batcher import Batcher

        t = self.cfg.train
        self.items = self.train_items()
        if not self.items:
            raise UserError(f"train.method {self.name} needs preference pairs (prompt + chosen/rejected) but the data holds none "
                            f"({len(self.data.train)} SFT samples): use preference data, or train.method: sft")
        if self.data.train:
            self.log(f"{self.name}: the data's {len(self.data.train)} SFT samples are not used")
        self.beta = self.cfg.preference.beta or DEFAULT_BETA.get(self.name, 0.1)
        return Batcher(self.items, None, t.micro_batch_size, t.grad_accum, self.accel.num_processes, t.seed)

    def _plan_steps(self) -> None:
        b = self.batcher
        if b.steps_per_epoch == 0:
            raise UserError(f"{len(self.items)} training {'examples' if self.name == 'kto' else 'pairs'} but one optimizer step needs "
                            f"{b.units_per_step} (micro_batch_size x grad_accum x processes): lower train.micro_batch_size or train.grad_accum")
        super()._plan_steps()

    def collate(self, micro, split: str = "train") -> dict:
        batch = collate_pairs(micro.items, self.tokenizer.pad_token_id, self.packed)
        if getattr(self, "reference", None) == "precomputed":
            ref = [self.ref_cache[split][u] for u in (micro.units or [0])]
            batch["ref_logps"] = torch.tensor([r[0] for r in ref] + [r[1] for r in ref])
        return _to_device(batch, self.accel.device)

    @staticmethod
    def count(batch) -> int:
        return int(batch["n_pairs"])

    # ---- loss -------------------------------------------------------------------------------------
    def loss(self, model, batch):
        p = self.cfg.preference
        logps, counts = sequence_logps(forward(model, batch), batch)
        ref = self.reference_logps(batch)
        n = self.count(batch)
        out = pl.dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta, p.loss_type, p.label_smoothing, counts[:n], counts[n:])
        return out.losses.sum(), _pair_metrics(out, logps[:n], logps[n:])

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """Summed log-probs of the batch's sequences under the reference model (no gradient)."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if self.reference == "adapter_disabled":  # LoRA: the base model is the reference, no second copy
                model = self.accel.unwrap_model(self.model)
                with model.disable_adapter():
                    return sequence_logps(forward(model, batch), batch)[0]
            return sequence_logps(forward(self.ref_model, batch), batch)[0]

    # ---- the reference model ----------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        if self.uses_reference:
            self._setup_reference()

    def _setup_reference(self) -> None:
        choice = self.cfg.preference.reference
        is_peft = hasattr(self.accel.unwrap_model(self.model), "disable_adapter")
        if choice == "auto":
            choice = "adapter_disabled" if is_peft else "frozen_copy"
        if choice == "adapter_disabled" and not is_peft:
            raise UserError("preference.reference: adapter_disabled needs a LoRA model (train.finetune: lora)")
        self.reference = choice
        if choice == "frozen_copy":
            self.ref_model = self.accel.prepare_model(self._load_reference(), evaluation_mode=True)
        elif choice == "precomputed":
            self.ref_cache = self._precomputed_reference()
        self.log(f"{self.name}: reference = {choice}")

    def _load_reference(self):
        from tuneforge.model.adapters import resize_embeddings
        from tuneforge.model.load import load_model

        ref = load_model(self.source, self.cfg.model)
        resize_embeddings(ref, self.tokenizer)  # same rows as the policy got
        return ref.requires_grad_(False).eval()

    def _precomputed_reference(self) -> dict:
        """Reference log-probs of every train and eval item, computed once and cached beside the prepared
        data (keyed by the data fingerprint and the base model's files), so a resume reads them back."""
        import json

        from tuneforge.data.prepare import cache_path

        path = cache_path(self.cfg.data, self.data.fingerprint) / f"reference-{self.name}-{self._reference_key()}.json"
        if path.is_file():
            self.log(f"{self.name}: reference log-probs from {path}")
            return json.loads(path.read_text())
        self.reference = "adapter_disabled" if hasattr(self.accel.unwrap_model(self.model), "disable_adapter") else "frozen_copy"
        fresh = self.reference == "frozen_copy" and self.start_step > 0  # resumed: the live weights are no longer the base
        self.ref_model = self.accel.prepare_model(self._load_reference(), evaluation_mode=True) if fresh else self.model
        was_training = self.model.training
        self.model.eval()
        cache = {"train": self._reference_values(self.items, "train"), "eval": self._reference_values(self.eval_items(), "eval")}
        self.model.train(was_training)
        self.reference, self.ref_model = "precomputed", None
        if self.accel.is_main_process:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(path)
        self.log(f"{self.name}: reference log-probs computed once for {len(cache['train'])} + {len(cache['eval'])} items -> {path}")
        return cache

    def _reference_values(self, items: list, split: str) -> list:
        """[per item: its reference values] over all ranks (each computes its shard; ZeRO-3 needs all in every forward)."""
        from tuneforge.data.batcher import eval_batches

        rank, world, mbs = self.accel.process_index, self.accel.num_processes, self.cfg.train.micro_batch_size
        rows = []
        for mb in eval_batches(items, mbs, rank, world):
            batch = self.collate(mb, split)
            values = self._reference_rows(batch)  # (B, k)
            ids = torch.tensor(mb.units if not mb.dummy else [-1] * len(values), dtype=values.dtype, device=values.device)
            rows.append(torch.cat([ids[:, None], values], dim=1))
        width = 3  # item index, two reference values
        local = torch.cat(rows) if rows else torch.zeros(0, width, device=self.accel.device)
        local = torch.cat([local, torch.full((mbs * len(rows) - len(local), width), -1.0, device=local.device)]) if rows else local
        gathered = self.accel.gather(local.double()).tolist()
        out = [None] * len(items)
        for idx, *vals in gathered:
            if idx >= 0:
                out[int(idx)] = vals
        return out

    def _reference_rows(self, batch: dict) -> torch.Tensor:
        ref = self.reference_logps(batch)
        n = self.count(batch)
        return torch.stack([ref[:n], ref[n:]], dim=1)

    def _reference_key(self) -> str:
        import hashlib
        from pathlib import Path

        h = hashlib.sha256(json_dumps(self.cfg.model.model_dump()).encode())
        src = Path(self.source)
        for f in sorted(src.glob("*")) if src.is_dir() else [src]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:12]

    # ---- train and eval ---------------------------------------------------------------------------
    def step_constants(self, batches: list[dict]) -> None:
        """Values the whole step's loss needs before its first backward (ORPO: token count; KTO: KL)."""

    def backward_step(self, step: int) -> dict:
        from tuneforge.train.step import accumulate

        sb = self.batcher.step(step, self.accel.process_index)
        batches = [self.collate(mb) for mb in sb.micro]
        self.step_constants(batches)
        m = accumulate(self.accel, self.model, batches, self.loss, self.count, lambda b: int(b["real_tokens"]))
        m["pairs"] = m.pop("target_tokens")
        return {**m, "epoch": sb.epoch}

    def eval_loss(self) -> float:
        """Loss over the held-out pairs (also computes held-out rewards, margin and accuracy: self.last_eval)."""
        self.last_eval = self.evaluate_pairs()
        return self.last_eval.get("eval_loss", float("nan"))

    def eval_pair_loss(self, model, batch):
        return self.loss(model, batch)

    def evaluate_pairs(self) -> dict:
        from tuneforge.data.batcher import eval_batches

        items = self.eval_items()
        if not items:
            return {}
        mine = eval_batches(items, self.cfg.train.micro_batch_size, self.accel.process_index, self.accel.num_processes)
        batches = [(self.collate(mb, "eval"), mb.dummy) for mb in mine]
        self.step_constants([b for b, _ in batches])
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for batch, dummy in batches:
                with self.accel.autocast():
                    loss, metrics = self.eval_pair_loss(self.model, batch)
                if dummy:
                    continue
                for k, v in {"loss": loss, **metrics, "n": torch.tensor(float(self.count(batch)))}.items():
                    sums[k] = sums.get(k, 0) + v.detach().double().to(self.accel.device)
        self.model.train(was_training)
        keys = ["loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "n"]
        local = torch.stack([sums.get(k, torch.zeros((), dtype=torch.float64, device=self.accel.device)) for k in keys])
        total = dict(zip(keys, self.accel.reduce(local, reduction="sum").tolist()))
        n = max(total.pop("n"), 1)
        return {f"eval_{k}": v / n for k, v in total.items()}

    def train(self) -> dict:
        if self.start_step == 0 and self.eval_items():
            self.eval_before = self.evaluate_pairs()
            self.log(f"{self.name}: held-out reward accuracy before training {self.eval_before['eval_reward_accuracy']:.3f}")
        return super().train()

    def save(self, last: dict) -> dict:
        after = self.evaluate_pairs()
        if after and self.accel.is_main_process:
            self.tracker.log(self.total_steps, **after)
        summary = super().save(last)
        summary.update({k: v for k, v in last.items() if k.startswith(("reward", "logps", "kl"))})
        summary.update(after)
        summary.update({f"{k}_before": v for k, v in getattr(self, "eval_before", {}).items()})
        if self.accel.is_main_process:
            self.run.update(summary=summary, method=self.name, reference=getattr(self, "reference", None))
        return summary

    def _write_run_files(self) -> None:
        super()._write_run_files()
        if self.accel.is_main_process:  # merge checks parity on these: chosen sequences stand in for SFT samples
            self.run.write_json(self.run.parity_samples, [(p.chosen if hasattr(p, "chosen") else p.encoded).input_ids for p in (self.eval_items() or self.items)[:4]])


def json_dumps(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


class ORPORecipe(DPORecipe):
    """ORPO: reference-free; loss = NLL of the chosen completions + lambda * odds-ratio term."""

    name = "orpo"
    uses_reference = False

    def step_constants(self, batches: list[dict]) -> None:
        # NLL per chosen token of the whole step (all micro-batches, all processes), ORPO term per pair: the
        # core divides by pairs, so the NLL sum is pre-scaled by pairs / chosen tokens.
        local = torch.tensor([sum(self.count(b) for b in batches), sum(_chosen_tokens(b) for b in batches)],
                             dtype=torch.float64, device=self.accel.device)
        pairs, tokens = self.accel.reduce(local, reduction="sum").tolist()
        self.nll_scale = pairs / max(tokens, 1)

    def loss(self, model, batch):
        logps, counts = sequence_logps(forward(model, batch), batch)
        n = self.count(batch)
        avg = logps / counts.clamp(min=1)
        out = pl.orpo_loss(avg[:n], avg[n:], self.cfg.preference.orpo_lambda)
        nll = -logps[:n].sum() * self.nll_scale
        metrics = {**_pair_metrics(out, logps[:n], logps[n:]), "nll_loss": nll.detach(),
                   "log_odds_chosen": pl.orpo_log_odds(avg[:n], avg[n:]).sum()}
        return out.losses.sum() + nll, metrics


def _chosen_tokens(batch: dict) -> int:
    n = int(batch["n_pairs"])
    return int(((batch["seq"] >= 0) & (batch["seq"] < n)).sum())


class SimPORecipe(DPORecipe):
    """SimPO: reference-free, length-normalised log-probs with a target margin gamma."""

    name = "simpo"
    uses_reference = False

    def loss(self, model, batch):
        p = self.cfg.preference
        logps, counts = sequence_logps(forward(model, batch), batch)
        n = self.count(batch)
        avg = logps / counts.clamp(min=1)
        out = pl.simpo_loss(avg[:n], avg[n:], self.beta, p.simpo_gamma, p.label_smoothing)
        return out.losses.sum(), _pair_metrics(out, logps[:n], logps[n:])


class KTORecipe(DPORecipe):
    """KTO: unpaired examples (KTO rows, or each pair's chosen as desirable and rejected as undesirable);
    the reference point is the step's KL estimate on mismatched (prompt, completion) pairs."""

    name = "kto"

    def train_items(self) -> list:
        from tuneforge.data.preference import Pair, pairs_to_unpaired

        pairs = [x for x in self.data.pairs if isinstance(x, Pair)]
        return [x for x in self.data.pairs if not isinstance(x, Pair)] + pairs_to_unpaired(pairs)

    def collate(self, micro, split: str = "train") -> dict:
        if split == "eval":  # held-out pairs: accuracy of the implicit reward, as for DPO
            return super().collate(micro, split)
        units = micro.units or [0]
        # The KL partner of item i is item i-1 (fixed per item, so reference values can be precomputed).
        partners = [self.items[(u - 1) % len(self.items)] for u in units]
        batch = collate_unpaired(micro.items, self.tokenizer.pad_token_id, self.packed, partners)
        if getattr(self, "reference", None) == "precomputed":
            ref = [self.ref_cache["train"][u] for u in units]
            batch["ref_logps"], batch["kl"]["ref_logps"] = torch.tensor([r[0] for r in ref]), torch.tensor([r[1] for r in ref])
        return _to_device(batch, self.accel.device)

    def _reference_rows(self, batch: dict) -> torch.Tensor:
        if "kl" not in batch:  # eval pairs
            return super()._reference_rows(batch)
        return torch.stack([self.reference_logps(batch), self.reference_logps(batch["kl"])], dim=1)

    def step_constants(self, batches: list[dict]) -> None:
        # The reference point z0 = E[log pi/pi_ref] on mismatched pairs, over the whole step, clamped at 0, no gradient.
        local = torch.zeros(2, dtype=torch.float64, device=self.accel.device)
        with torch.no_grad():
            for b in batches:
                if "kl" in b:
                    with self.accel.autocast():
                        ratio = sequence_logps(forward(self.model, b["kl"]), b["kl"])[0] - self.reference_logps(b["kl"])
                    local += torch.stack([ratio.double().sum(), torch.tensor(float(len(ratio)), dtype=torch.float64, device=local.device)])
        total, n = self.accel.reduce(local, reduction="sum").tolist()
        self.kl = torch.tensor(max(total / n, 0.0) if n else 0.0, device=self.accel.device)

    def loss(self, model, batch):
        p = self.cfg.preference
        logps, _ = sequence_logps(forward(model, batch), batch)
        ref = self.reference_logps(batch)
        desirable = batch["desirable"]
        out = pl.kto_loss(logps, ref, desirable, self.kl, self.beta, p.desirable_weight, p.undesirable_weight)
        d = desirable.float()
        metrics = {"_rewards_chosen": out.chosen_rewards.sum(), "_rewards_rejected": out.rejected_rewards.sum(),
                   "_logps_chosen": (logps.detach() * d).sum(), "_logps_rejected": (logps.detach() * (1 - d)).sum(),
                   "_desirable": d.sum(), "kl": self.kl * len(d)}
        return out.losses.sum(), metrics

    def eval_pair_loss(self, model, batch):
        """Held-out pairs: the KTO loss of chosen (desirable) and rejected (undesirable) at KL 0, and the
        implicit rewards' accuracy and margin, as for DPO."""
        p = self.cfg.preference
        logps, _ = sequence_logps(forward(model, batch), batch)
        ref = self.reference_logps(batch)
        n = self.count(batch)
        desirable = torch.arange(2 * n, device=logps.device) < n
        kto = pl.kto_loss(logps, ref, desirable, torch.zeros((), device=logps.device), self.beta, p.desirable_weight, p.undesirable_weight)
        out = pl.PairLoss(kto.losses, kto.chosen_rewards, kto.rejected_rewards)
        return kto.losses.sum() / 2, _pair_metrics(out, logps[:n], logps[n:])

    def backward_step(self, step: int) -> dict:
        m = super().backward_step(step)
        n = m.pop("pairs")
        des = m.pop("_desirable") * n  # the core divided every sum by the example count
        m["examples"] = n
        m["rewards_chosen"] = m.pop("_rewards_chosen") * n / max(des, 1)
        m["rewards_rejected"] = m.pop("_rewards_rejected") * n / max(n - des, 1)
        m["logps_chosen"] = m.pop("_logps_chosen") * n / max(des, 1)
        m["logps_rejected"] = m.pop("_logps_rejected") * n / max(n - des, 1)
        m["reward_margin"] = m["rewards_chosen"] - m["rewards_rejected"]
        return m


RECIPES = {"dpo": DPORecipe, "orpo": ORPORecipe, "simpo": SimPORecipe, "kto": KTORecipe}
