"""The training loop every method shares. Reads top to bottom: check -> setup -> train -> save.

The loop owns the run: its directory (RunDir), the guard (lock, signals, watchdog), the Accelerator, the
model, optimizer and schedule, checkpoints (with the recipe's own state), eval scheduling and tracking.
A recipe (train/core/recipe.py) gives it the batches of a step, their loss and count, and its eval.
"""

from __future__ import annotations

import math
import time

from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.outputs import clear_output_dir, mark_output_dir
from tuneforge.rundir import RunDir, versions
from tuneforge.train.core.recipe import hook


class Trainer:
    """One run of one recipe. Also the recipe's `ctx` (see train/core/recipe.py for what a recipe reads)."""

    def __init__(self, cfg: Config, recipe, resume: bool = False, log=print):
        from tuneforge.train.safety.guard import RunGuard

        self.cfg, self.recipe, self.resume, self.log = cfg, recipe, resume, log
        self.run = RunDir(cfg.run_dir)
        self.started = False  # True once this invocation owns the run's status
        self.model = None
        self.start_step = self.total_steps = 0
        # Cheap checks before anything heavy: lock, resume checks (config changes, finished runs): safety/guard.py.
        self.guard = RunGuard(cfg, self.run, resume, log)
        if not resume:
            self.run.check_new(cfg)  # never a folder holding another run, or one tuneforge did not write

    @property
    def eval_batch_size(self) -> int:
        """Samples (or pairs, prompts) per eval forward pass per process: train.eval_micro_batch_size or micro_batch_size."""
        t = self.cfg.train
        return t.eval_micro_batch_size or t.micro_batch_size

    @property
    def plain_model(self):
        """The model without its DDP / torch.compile wrappers (for generate, disable_adapter); never imports DeepSpeed
        in a run that does not use it (train/core/engine.py unwrap)."""
        from tuneforge.train.core.engine import unwrap

        return unwrap(self.accel, self.model)

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from tuneforge.model.adapters import prepare_for_training
        from tuneforge.model.load import load_model, load_tokenizer, resolve_model_dir
        from tuneforge.train.core import checkpoint
        from tuneforge.train.core.engine import make_accelerator, seed_everything
        from tuneforge.train.core.flops import mean_length, run_flops
        from tuneforge.train.core.launch import prepare_once

        cfg, t = self.cfg, self.cfg.train
        self.accel = make_accelerator(cfg)
        if cfg.output.overwrite and not self.resume and self.accel.is_main_process:
            clear_output_dir(self.run.root, "run", cfg.config_path)
        if self.accel.is_main_process:
            mark_output_dir(self.run.root, "run")
        self.accel.wait_for_everyone()
        self.guard.acquire(self.accel)
        seed_everything(t.seed)
        self.source = resolve_model_dir(cfg.model, self.log)
        self.tokenizer = load_tokenizer(self.source, cfg.model)
        # Preparation runs once (main process); the others wait for its cache on disk, not in a collective.
        # A recipe whose items are neither SFT samples nor pairs prepares its own (grpo: prompt rows).
        own = hook(self.recipe, "prepare_data")
        self.data = own(self) if own else prepare_once(self.accel, cfg.data, self.tokenizer, self.log)
        self.batcher = self.recipe.batcher(self)
        self._plan_steps()
        model = prepare_for_training(load_model(self.source, cfg.model), cfg, self.tokenizer, self.log)
        self.guard.preflight(model)  # enough disk for the checkpoints, before the first step
        self.flops_per_token, self.peak_flops = run_flops(model, mean_length(self.batcher.items, cfg.data.max_length))  # MFU
        optimizer, scheduler = self._optimizer(model)
        self.model, self.optimizer, self.scheduler = self.accel.prepare(model, optimizer, scheduler)
        checkpoint.install_trainable_only_hooks(self.accel)
        recipe_state = self._restore() if self.resume else None
        self._write_run_files()
        self.recipe.setup(self)  # reference models, caches, an eval before training
        if recipe_state is not None:
            self.recipe.load_state_dict(recipe_state)

    def _optimizer(self, model):
        """train.optimizer and its schedule - or DeepSpeed's own, when the run's DeepSpeed JSON has those sections."""
        from tuneforge.train.core.engines import deepspeed_sections, engine_optimizer
        from tuneforge.train.core.optim import build_optimizer, build_scheduler, param_groups
        from tuneforge.train.core.schedule import warmup_steps

        t = self.cfg.train
        sections = deepspeed_sections(self.accel)
        if not sections:
            optimizer = build_optimizer(model, t)
            return optimizer, build_scheduler(optimizer, t, self.total_steps)
        self.log(f"deepspeed: the JSON's {' and '.join(sections)} section{'s' if len(sections) > 1 else ''} "
                 f"({', '.join(s.get('type', '?') for s in sections.values())}) run inside DeepSpeed's engine")
        warm = warmup_steps(t.warmup_steps, t.warmup_ratio, self.total_steps)
        return engine_optimizer(self.accel, param_groups(model, t.weight_decay), t, self.total_steps, warm)

    def _plan_steps(self) -> None:
        t, d, b = self.cfg.train, self.cfg.data, self.batcher
        binned = len(b.units) != len(b.items)
        if b.steps_per_epoch == 0:
            what = f"{len(b.items)} training {getattr(self.recipe, 'items_name', 'items')}"
            raise UserError(
                f"{what}{f' packed into {len(b.units)} bins' if binned else ''} but one optimizer step needs {b.units_per_step} "
                "(micro_batch_size x grad_accum x processes): lower train.micro_batch_size or train.grad_accum"
                + (" or data.pack_length" if binned else "")
            )
        if d.packing == "bins" and "packing" in self.data.report:
            p = self.data.report["packing"]
            self.log(f"packing: {len(self.data.train)} samples in {p['bins']} bins of {p['pack_length']} tokens ({p['bin_fill']:.1%} full)")
        if self.data.report.get("truncated"):  # said once here, not only in data_report.json
            self.log(f"data: {self.data.report['truncated']} samples longer than data.max_length ({d.max_length}) were truncated "
                     "(raise data.max_length, or set data.clean.max_tokens to drop them)")
        self.total_steps = b.total_steps(t.epochs, t.max_steps)
        self.save_every = t.save_every or self._per_epoch("saves_per_epoch", "save_every")
        self.eval_every = t.eval_every or self._per_epoch("evals_per_epoch", "eval_every")
        # Known only now (steps and eval rows come from the data): refuse what would silently do nothing.
        if t.warmup_steps and t.warmup_steps >= self.total_steps:
            raise UserError(f"train.warmup_steps ({t.warmup_steps}) >= the run's {self.total_steps} steps: the learning rate "
                            "would never peak (lower warmup_steps, or use warmup_ratio)")
        if (self.eval_every or t.generate_eval.samples) and not (self.data.eval or self.data.eval_pairs):
            asked = ("eval_every" if t.eval_every else "evals_per_epoch") if self.eval_every else "generate_eval.samples"
            raise UserError(f"train.{asked} is set but the eval split is "
                            "empty (too little data for data.eval_split to hold out a row): raise data.eval_split, "
                            "set data.eval_size or data.eval")

    def _per_epoch(self, key: str, every: str) -> int | None:
        """train.saves_per_epoch / evals_per_epoch -> every N steps (at least that many per epoch), said once."""
        n = getattr(self.cfg.train, key)
        if not n:
            return None
        steps = self.batcher.steps_per_epoch
        value = max(1, steps // n)
        self.log(f"train.{key}: {n} -> {every} {value} ({steps} steps per epoch)")
        return value

    def _restore(self):
        """Weights, optimizer, schedule, RNGs and watchdog from the latest checkpoint -> the recipe's saved state."""
        from tuneforge.train.core import checkpoint

        ckpt = self.run.latest_checkpoint()
        if ckpt is None:  # killed before the first checkpoint: start again from step 0 in the same directory
            self.log(f"--resume: no complete checkpoint in {self.run.checkpoints} yet; training starts again from step 0")
            return None
        meta = checkpoint.check_compatible(ckpt, self.data.fingerprint, self.batcher.signature())
        checkpoint.load(self.accel, ckpt)
        self.guard.restore(meta)
        self.start_step = meta["step"]
        self.log(f"resumed from {ckpt} (step {meta['step']})")
        return checkpoint.load_recipe_state(ckpt, self.accel.process_index)

    def _write_run_files(self) -> None:
        if self.accel.is_main_process:
            self.run.write_config(self.cfg)
            self.run.write_json(self.run.data_report, self.data.report)
            # A few token sequences kept with the run so `merge` can check parity from the directory alone.
            samples = hook(self.recipe, "parity_samples")
            ids = samples() if samples else [s.input_ids for s in (self.data.eval or self.data.train)[:4]]
            self.run.write_json(self.run.parity_samples, ids)
            self.run.start(
                recipe=self.recipe.name, finetune=self.cfg.train.finetune, base_model=self.cfg.model.model_dump(),
                base_model_dir=self.source, data_fingerprint=self.data.fingerprint, versions=versions(),
                total_steps=self.total_steps, processes=self.accel.num_processes, packing=self.data.report.get("packing"),
            )
        self.started = True

    # ---- train ------------------------------------------------------------------------------------
    def backward_step(self, step: int) -> dict:
        """Forward + backward over this process's micro-batches of `step`; grads hold d(loss)/d(params) after."""
        from tuneforge.train.core.loss import real_tokens
        from tuneforge.train.core.step import accumulate

        r = self.recipe
        sb = self.batcher.step(step, self.accel.process_index)
        m = accumulate(self.accel, self.model, r.batches(sb), r.loss, r.count, hook(r, "tokens") or real_tokens)
        if r.unit != "target_tokens":
            m[r.unit] = m.pop("target_tokens")
        m["epoch"] = sb.epoch
        reshape = hook(r, "step_metrics")
        return reshape(m) if reshape else m

    def train(self) -> dict:
        from tuneforge.train.core.engine import generate_eval, update_bar
        from tuneforge.train.core.flops import mfu
        from tuneforge.train.core.step import update
        from tuneforge.train.observe.tracking import Tracker, progress_bar

        t = self.cfg.train
        self.tracker = Tracker(self.run.root, self.cfg.tracking.tensorboard, enabled=self.accel.is_main_process,
                               tracking=self.cfg.tracking, config=self.cfg.model_dump(mode="json"))
        if self.resume:
            self.tracker.truncate_after(self.start_step)
        if self.start_step == 0 and t.generate_eval.samples:
            generate_eval(self, step=0, tag="before")
        self.model.train()
        last, last_line = {}, time.monotonic()
        with progress_bar(self.total_steps, self.start_step) as bar:
            for step in range(self.start_step, self.total_steps):
                began = time.perf_counter()
                self.guard.before_step(step + 1, self.model)
                last = self.backward_step(step)
                last.update(update(self.accel, self.model, self.optimizer, self.scheduler, t.max_grad_norm))
                last["tokens_per_s"] = round(last["tokens"] / (time.perf_counter() - began), 1)
                done = step + 1
                self.guard.measure(last)
                if self.peak_flops:  # known device: model FLOPs utilisation of this step, all processes together
                    last["mfu"] = round(mfu(last["tokens_per_s"], self.flops_per_token, self.peak_flops, self.accel.num_processes), 4)
                if done % t.log_every == 0 or done == self.total_steps:
                    self.tracker.log(done, **last)
                signalled = self.guard.after_step(done, last, self.accel)  # NaN/divergence raises here, before any save
                last_line = update_bar(bar, done, self.total_steps, last, self.log, last_line)
                best = early = None
                if self.eval_every and done % self.eval_every == 0 and done != self.total_steps:
                    held_out = self.recipe.evaluate()
                    self.tracker.log(done, **held_out)
                    best, early = self.guard.after_eval(done, held_out.get("eval_loss", math.nan))
                if (self.save_every and done % self.save_every == 0) or signalled or early or (best and t.keep_best):
                    self._save_checkpoint(done, best=bool(best))
                if signalled:
                    self.guard.interrupt(done)  # status interrupted, exit 130; --resume continues
                if early:
                    self.log(early)
                    break
        return self.guard.loop_done(last)

    def _save_checkpoint(self, step: int, best: bool = False) -> None:
        from tuneforge.train.core import checkpoint

        meta = {"data_fingerprint": self.data.fingerprint, "batching": self.batcher.signature(), **self.guard.state()}
        state = hook(self.recipe, "state_dict")
        path = checkpoint.save(self.accel, self.run, step, meta, self.cfg.train.keep_checkpoints, state() if state else None)
        if self.accel.is_main_process:
            self.run.update(last_checkpoint=str(path), step=step)
        self.guard.checkpointed(step, path, best)  # best copy, report.html refreshed

    # ---- save -------------------------------------------------------------------------------------
    def save(self, last: dict) -> dict:
        from tuneforge.train.core.engine import generate_eval, generate_eval_before, save_final
        from tuneforge.train.observe.tracking import plot_loss

        summary = {"final_loss": last.get("loss"), "steps": self.total_steps, "data": self._data_counts()}
        held_out = self.recipe.evaluate()
        if held_out:
            self.tracker.log(self.total_steps, **held_out)
            summary.update(held_out)
        if self.cfg.train.generate_eval.samples:
            summary["generate_eval_after"] = generate_eval(self, self.total_steps, "after")
        save_final(self.accel, self.model, self.tokenizer, self.run.final)  # collective: gathers sharded weights
        extra = hook(self.recipe, "summary")
        summary.update(extra(last) if extra else {})
        if self.accel.is_main_process:
            self.tracker.close()
            if self.cfg.tracking.plot:
                plot_loss(self.run.root)
            before = generate_eval_before(self.run)
            if before:
                summary["generate_eval_before"] = before
            info = hook(self.recipe, "run_info")
            self.run.finish(final_dir=str(self.run.final), summary=summary, **(info() if info else {}))
        return summary

    def _data_counts(self) -> dict:
        """What the data preparation cut or left out, for the end-of-run summary (details: data_report.json)."""
        report = self.data.report
        return {"truncated": int(report.get("truncated") or 0), "skipped_rows": int(sum((report.get("skipped") or {}).values()))}

    def close(self) -> None:
        self.guard.close()  # report.html, lock released, signal handlers restored

    def fit(self) -> dict:
        """setup -> train -> save; a run that dies ends `failed` (or `interrupted`) with the one-line reason
        in run_info.json."""
        try:
            self.setup()
            return self.save(self.train())
        except BaseException as exc:
            from tuneforge.train.core.engine import record_failure

            record_failure(self, exc)
            raise
        finally:
            self.close()
