"""Supervised fine-tuning recipe (full or LoRA) on accelerate. Reads top to bottom: check -> setup -> train -> save.

Loss per optimizer step = sum of target-token cross-entropies / number of target tokens in the whole
step (all micro-batches, all processes). So batch 8 x accum 1 == batch 2 x accum 4, and packing does
not change the numbers.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
import time

from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.outputs import check_output_dir, clear_output_dir, mark_output_dir
from tuneforge.rundir import read_run_info, update_run_info, versions, write_config, write_json


class SFTRecipe:
    def __init__(self, cfg: Config, resume: bool = False, log=print):
        self.cfg, self.resume, self.log = cfg, resume, log
        self.run_dir = cfg.run_dir
        self._check_run_dir()

    # ---- checks that fail before anything heavy -------------------------------------------------
    def _check_run_dir(self) -> None:
        info_path = self.run_dir / "run_info.json"
        if self.resume:
            if not (self.run_dir / "checkpoints").is_dir():
                raise UserError(f"--resume: no checkpoints in {self.run_dir}; set train.save_every and train first")
            return
        if info_path.is_file() and not self.cfg.output.overwrite:
            status = read_run_info(self.run_dir).get("status")
            fix = "add --resume to continue it" if status != "finished" else "choose another output.dir"
            raise UserError(f"{self.run_dir} already holds a {status} run: {fix}, or --set output.overwrite=true")
        # Only ever replace a directory that is a tuneforge run (never '.', a parent, or a user's folder).
        check_output_dir(self.run_dir, "run", self.cfg.output.overwrite, "output.overwrite=true", self.cfg.config_path)

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from accelerate import Accelerator

        from tuneforge.data.prepare import prepare
        from tuneforge.model.load import load_model, load_tokenizer, resolve_model_dir

        cfg = self.cfg
        self.accel = Accelerator(mixed_precision=self._mixed_precision(), cpu=not torch.cuda.is_available())
        if cfg.output.overwrite and not self.resume and self.accel.is_main_process:
            clear_output_dir(self.run_dir, "run", cfg.config_path)
        if self.accel.is_main_process:
            mark_output_dir(self.run_dir, "run")
        self.accel.wait_for_everyone()
        self._seed(cfg.train.seed)
        self.source = resolve_model_dir(cfg.model, self.log)
        self.tokenizer = load_tokenizer(self.source, cfg.model)
        with self.accel.main_process_first():  # preparation runs once; other ranks hit the cache
            self.data = prepare(cfg.data, self.tokenizer)
        if not self.data.train:
            raise UserError(f"the data holds {len(self.data.pairs)} preference pairs and no SFT samples: preference training "
                            "(DPO) is not available yet; `tuneforge prepare` stores the pairs for it")
        self._plan_steps()
        model = load_model(self.source, cfg.model)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        if cfg.train.finetune == "lora":
            from tuneforge.model.adapters import add_lora

            model = add_lora(model, cfg.lora)
        self.model = model
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay
        )
        self.model, self.optimizer = self.accel.prepare(self.model, self.optimizer)
        self.scheduler = self._scheduler()
        self.start_step = self._restore() if self.resume else 0
        self._write_run_files()

    def _mixed_precision(self) -> str:
        import torch

        mp = self.cfg.train.mixed_precision
        if mp != "auto":
            return mp
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"

    def _seed(self, seed: int) -> None:
        import torch

        random.seed(seed)
        torch.manual_seed(seed)

    def _plan_steps(self) -> None:
        t, d, world = self.cfg.train, self.cfg.data, self.accel.num_processes
        # A unit is one sample, or one bin of samples with packing: bins (planned by prepare). Epochs shuffle units.
        self.units = self.data.units
        self.step_units = t.micro_batch_size * t.grad_accum * world  # units per optimizer step
        self.steps_per_epoch = len(self.units) // self.step_units
        if self.steps_per_epoch == 0:
            what = f"{len(self.data.train)} training samples" + (f" packed into {len(self.units)} bins" if d.packing == "bins" else "")
            raise UserError(
                f"{what} but one optimizer step needs {self.step_units} (micro_batch_size x grad_accum x processes): "
                "lower train.micro_batch_size or train.grad_accum" + (" or data.pack_length" if d.packing == "bins" else "")
            )
        if d.packing == "bins":
            p = self.data.report["packing"]
            self.log(f"packing: {len(self.data.train)} samples in {p['bins']} bins of {p['pack_length']} tokens ({p['bin_fill']:.1%} full)")
        self.total_steps = t.max_steps or math.ceil(t.epochs * self.steps_per_epoch)

    def _scheduler(self):
        import torch

        from tuneforge.train.schedule import lr_lambda, warmup_steps

        t = self.cfg.train
        warm = warmup_steps(t.warmup_steps, t.warmup_ratio, self.total_steps)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t.lr_scheduler, warm, self.total_steps))

    def _restore(self) -> int:
        from tuneforge.train.checkpoint import latest_checkpoint, load_checkpoint

        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        state = load_checkpoint(ckpt, self.accel.unwrap_model(self.model), self.optimizer, self.scheduler)
        if state.get("data_fingerprint") != self.data.fingerprint:
            raise UserError(f"--resume: the data changed since {ckpt.name} (fingerprint differs); resume needs the same data")
        if state.get("batching", self._batching()) != self._batching():
            raise UserError(f"--resume: {ckpt.name} was saved with {state['batching']} (data.packing, data.pack_length, "
                            "train.micro_batch_size, train.grad_accum, processes); resume needs the same batching")
        self.log(f"resumed from {ckpt} (step {state['step']})")
        return state["step"]

    def _batching(self) -> str:
        """What decides which samples each step sees; a resume must not change it mid-run."""
        d = self.cfg.data
        return f"packing={d.packing} bin={d.bin_tokens} units={len(self.units)} step={self.step_units}"

    def _write_run_files(self) -> None:
        if not self.accel.is_main_process:
            return
        write_config(self.run_dir, self.cfg)
        write_json(self.run_dir / "data_report.json", self.data.report)
        # A few token sequences kept with the run so `merge` can check parity from the directory alone.
        write_json(self.run_dir / "parity_samples.json", [s.input_ids for s in (self.data.eval or self.data.train)[:4]])
        update_run_info(
            self.run_dir, status="running", finetune=self.cfg.train.finetune, base_model=self.cfg.model.model_dump(),
            base_model_dir=self.source, data_fingerprint=self.data.fingerprint, versions=versions(),
            total_steps=self.total_steps, processes=self.accel.num_processes, packing=self.data.report.get("packing"),
        )

    # ---- train ------------------------------------------------------------------------------------
    def train(self) -> dict:
        from tuneforge.train.tracking import Tracker, progress_bar

        t = self.cfg.train
        self.tracker = Tracker(self.run_dir, self.cfg.tracking.tensorboard, enabled=self.accel.is_main_process)
        if self.resume:
            self.tracker.truncate_after(self.start_step)
        if self.start_step == 0 and t.generate_eval.samples:
            self._generate_eval(step=0, tag="before")
        self.model.train()
        last = {}
        with progress_bar(self.total_steps, self.start_step) as bar:
            for step in range(self.start_step, self.total_steps):
                began = time.perf_counter()
                last = self._optimizer_step(step)
                last["tokens_per_s"] = round(last["tokens"] / (time.perf_counter() - began), 1)
                done = step + 1
                if done % t.log_every == 0 or done == self.total_steps:
                    self.tracker.log(done, **last)
                self._update_bar(bar, done, last)
                if t.eval_every and done % t.eval_every == 0 and done != self.total_steps:
                    self.tracker.log(done, eval_loss=self.eval_loss())
                if t.save_every and done % t.save_every == 0:
                    self._save_checkpoint(done)
        return last

    def _batches_for_step(self, step: int):
        """The micro-batches (lists of rows of samples) of this process for one optimizer step; the order
        depends only on seed and epoch."""
        import torch

        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.units), generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch)).tolist()
        chunk = order[within * self.step_units : (within + 1) * self.step_units]
        mbs, rank = self.cfg.train.micro_batch_size, self.accel.process_index
        mine = chunk[rank * mbs * self.cfg.train.grad_accum : (rank + 1) * mbs * self.cfg.train.grad_accum]
        # Rows of samples: one row per bin, or the whole micro-batch as one row (collate pads or packs it).
        micro = [[self.units[u] for u in mine[k : k + mbs]] for k in range(0, len(mine), mbs)]
        if self.cfg.data.packing != "bins":
            micro = [[[i for unit in units for i in unit]] for units in micro]
        return [[[self.data.train[i] for i in row] for row in rows] for rows in micro], epoch

    def _optimizer_step(self, step: int) -> dict:
        metrics = self.backward_step(step)
        metrics["grad_norm"] = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    @property
    def _packed(self) -> bool:
        return self.cfg.data.packing != "off"

    def backward_step(self, step: int) -> dict:
        """Forward + backward over this step's micro-batches; gradients hold d(loss)/d(params) after."""
        import torch

        from tuneforge.data.collate import collate
        from tuneforge.train.loss import count_targets, forward_logits, real_tokens, summed_ce

        micro, epoch = self._batches_for_step(step)
        device = self.accel.device
        batches = [{k: v.to(device) for k, v in collate(mb, self.tokenizer.pad_token_id, self._packed).items()} for mb in micro]
        local = torch.tensor([sum(count_targets(b) for b in batches), sum(real_tokens(b) for b in batches)], device=device)
        n_targets, n_tokens = self.accel.reduce(local, reduction="sum").tolist()
        # DDP averages gradients over processes; scaling by world size turns that back into a sum.
        scale = self.accel.num_processes / n_targets
        total = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with (self.accel.no_sync(self.model) if not sync else nullcontext()), self.accel.autocast():
                loss_sum = summed_ce(forward_logits(self.model, batch), batch["targets"])
            self.accel.backward(loss_sum * scale)
            total += loss_sum.detach()
        loss = self.accel.reduce(total, reduction="sum").item() / n_targets
        return {"loss": loss, "epoch": epoch, "tokens": int(n_tokens), "target_tokens": int(n_targets)}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.train.max_grad_norm is None:
            import torch

            return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        return float(self.accel.clip_grad_norm_(params, self.cfg.train.max_grad_norm))

    def _update_bar(self, bar, done: int, m: dict) -> None:
        bar.update(bar.task_ids[0], completed=done, loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tps=f"{m['tokens_per_s']:.0f}")
        if not bar.live.is_started or bar.disable:
            every = max(1, self.total_steps // 10)
            if done % every == 0 or done == self.total_steps:
                self.log(f"step {done}/{self.total_steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s")

    def eval_loss(self) -> float:
        """Cross-entropy per target token over the whole eval split."""
        import torch

        from tuneforge.data.collate import collate
        from tuneforge.train.loss import count_targets, forward_logits, summed_ce

        if not self.data.eval:
            return float("nan")
        self.model.eval()
        total, count = torch.zeros((), device=self.accel.device), 0
        mbs = self.cfg.train.micro_batch_size
        with torch.no_grad():
            for k in range(0, len(self.data.eval), mbs):
                b = {n: v.to(self.accel.device) for n, v in collate([self.data.eval[k : k + mbs]], self.tokenizer.pad_token_id, self._packed).items()}
                with self.accel.autocast():
                    total += summed_ce(forward_logits(self.model, b), b["targets"])
                count += count_targets(b)
        self.model.train()
        return total.item() / count

    def _generate_eval(self, step: int, tag: str) -> dict:
        from tuneforge.metrics import score
        from tuneforge.model.generate import generate_batch

        g = self.cfg.train.generate_eval
        convs = [s.messages for s in self.data.eval if isinstance(s.messages, list)][: g.samples]  # not corpus text
        last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in convs]
        prompts = [c[:i] for c, i in zip(convs, last)]
        refs = [c[i]["content"] for c, i in zip(convs, last)]
        preds = generate_batch(self.accel.unwrap_model(self.model), self.tokenizer, prompts, g.max_new_tokens)
        result = score(preds, refs, g.metric)
        if self.accel.is_main_process:
            self.tracker.log(step, **{f"{k}_{tag}": v for k, v in result.items()})
            examples = [{"prompt": p[-1]["content"], "reference": r, "prediction": o} for p, r, o in zip(prompts, refs, preds)]
            write_json(self.run_dir / f"generate_eval_{tag}.json", {"step": step, **result, "examples": examples})
        return result

    def _save_checkpoint(self, step: int) -> None:
        from tuneforge.train.checkpoint import save_checkpoint

        self.accel.wait_for_everyone()
        if self.accel.is_main_process:
            path = save_checkpoint(
                self.run_dir / "checkpoints", step, self.accel.unwrap_model(self.model), self.optimizer, self.scheduler,
                {"data_fingerprint": self.data.fingerprint, "batching": self._batching()}, self.cfg.train.keep_checkpoints,
            )
            update_run_info(self.run_dir, last_checkpoint=str(path), step=step)

    # ---- save -------------------------------------------------------------------------------------
    def save(self, last: dict) -> dict:
        from tuneforge.train.tracking import plot_loss

        summary = {"final_loss": last.get("loss"), "steps": self.total_steps}
        if self.data.eval:
            summary["eval_loss"] = self.eval_loss()
            self.tracker.log(self.total_steps, eval_loss=summary["eval_loss"])
        if self.cfg.train.generate_eval.samples:
            summary["generate_eval_after"] = self._generate_eval(self.total_steps, "after")
        self.accel.wait_for_everyone()
        if self.accel.is_main_process:
            final = self.run_dir / "final"
            model = self.accel.unwrap_model(self.model)
            model.save_pretrained(final, safe_serialization=True)
            self.tokenizer.save_pretrained(final)  # with its chat template: inference renders like training
            self.tracker.close()
            if self.cfg.tracking.plot:
                plot_loss(self.run_dir)
            before = self.run_dir / "generate_eval_before.json"
            if before.is_file():
                import json

                summary["generate_eval_before"] = {k: v for k, v in json.loads(before.read_text()).items() if k.startswith("gen_")}
            update_run_info(self.run_dir, status="finished", final_dir=str(final), summary=summary)
        return summary


def run(cfg: Config, resume: bool = False, log=print) -> dict:
    recipe = SFTRecipe(cfg, resume=resume, log=log)
    recipe.setup()
    last = recipe.train()
    return recipe.save(last)
