"""Supervised fine-tuning. Reads top to bottom: check -> setup -> train -> save.

The recipe is its batch (collate of SFT samples), its loss (summed masked cross-entropy, normalised by
the target tokens of the whole step across micro-batches and processes) and its metrics. Everything else
is the shared core: Batcher (data order), step.accumulate/update (one optimizer step), checkpoint
(accelerate save_state/load_state), RunDir (paths + status).
"""

from __future__ import annotations

import time

from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.outputs import clear_output_dir, mark_output_dir
from tuneforge.rundir import RunDir, versions


class SFTRecipe:
    name = "sft"

    def __init__(self, cfg: Config, resume: bool = False, log=print):
        self.cfg, self.resume, self.log = cfg, resume, log
        self.run = RunDir(cfg.run_dir)
        self.started = False  # True once this invocation owns the run's status
        self._check_run_dir()

    # ---- checks that fail before anything heavy -------------------------------------------------
    def _check_run_dir(self) -> None:
        from tuneforge.train.guard import RunGuard

        # Lock, resume checks (config changes, finished runs), watchdog, signals: see train/guard.py.
        self.guard = RunGuard(self.cfg, self.run, self.resume, self.log)
        if not self.resume:
            self.run.check_new(self.cfg)  # never a folder holding another run, or one tuneforge did not write

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from tuneforge.train.launch import prepare_once
        from tuneforge.model.adapters import prepare_for_training
        from tuneforge.model.load import load_model, load_tokenizer, resolve_model_dir
        from tuneforge.train import checkpoint
        from tuneforge.train.engine import make_accelerator, seed_everything
        from tuneforge.train.flops import mean_length, run_flops
        from tuneforge.train.optim import build_optimizer, build_scheduler

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
        self.data = prepare_once(self.accel, cfg.data, self.tokenizer, self.log)
        self.packed = cfg.data.packing != "off"
        self.batcher = self.make_batcher()
        self._plan_steps()
        model = prepare_for_training(load_model(self.source, cfg.model), cfg, self.tokenizer, self.log)
        self.guard.preflight(model)  # enough disk for the checkpoints, before the first step
        self.flops_per_token, self.peak_flops = run_flops(model, mean_length(self.batcher.items, cfg.data.max_length))  # MFU
        optimizer = build_optimizer(model, t)
        scheduler = build_scheduler(optimizer, t, self.total_steps)
        self.model, self.optimizer, self.scheduler = self.accel.prepare(model, optimizer, scheduler)
        checkpoint.install_trainable_only_hooks(self.accel)
        self.start_step = self._restore() if self.resume else 0
        self._write_run_files()

    def make_batcher(self):
        """The training items and how they are dealt out (a preference recipe deals pairs: train/dpo.py)."""
        from tuneforge.data.batcher import Batcher

        cfg, t = self.cfg, self.cfg.train
        if not self.data.train:
            raise UserError(f"the data holds {len(self.data.pairs) + len(self.data.eval_pairs)} preference pairs / KTO rows and no "
                            "SFT samples: set train.method: dpo (or orpo, simpo, kto) to train on them")
        return Batcher(self.data.train, self.data.units, t.micro_batch_size, t.grad_accum, self.accel.num_processes,
                       t.seed, layout="packed" if cfg.data.packing == "padding_free" else "rows")

    def _plan_steps(self) -> None:
        t, d, b = self.cfg.train, self.cfg.data, self.batcher
        if b.steps_per_epoch == 0:
            what = f"{len(self.data.train)} training samples" + (f" packed into {len(b.units)} bins" if d.packing == "bins" else "")
            raise UserError(
                f"{what} but one optimizer step needs {b.units_per_step} (micro_batch_size x grad_accum x processes): "
                "lower train.micro_batch_size or train.grad_accum" + (" or data.pack_length" if d.packing == "bins" else "")
            )
        if d.packing == "bins":
            p = self.data.report["packing"]
            self.log(f"packing: {len(self.data.train)} samples in {p['bins']} bins of {p['pack_length']} tokens ({p['bin_fill']:.1%} full)")
        if self.data.report.get("truncated"):  # said once here, not only in data_report.json
            self.log(f"data: {self.data.report['truncated']} samples longer than data.max_length ({d.max_length}) were truncated "
                     "(raise data.max_length, or set data.clean.max_tokens to drop them)")
        self.total_steps = b.total_steps(t.epochs, t.max_steps)
        # Known only now (steps and eval rows come from the data): refuse what would silently do nothing.
        if t.warmup_steps and t.warmup_steps >= self.total_steps:
            raise UserError(f"train.warmup_steps ({t.warmup_steps}) >= the run's {self.total_steps} steps: the learning rate "
                            "would never peak (lower warmup_steps, or use warmup_ratio)")
        if (t.eval_every or t.generate_eval.samples) and not (self.data.eval or self.data.eval_pairs):
            raise UserError(f"train.{'eval_every' if t.eval_every else 'generate_eval.samples'} is set but the eval split is "
                            "empty (too little data for data.eval_split to hold out a row): raise data.eval_split, "
                            "set data.eval_size or data.eval")

    def _restore(self) -> int:
        from tuneforge.train import checkpoint

        ckpt = self.run.latest_checkpoint()
        if ckpt is None:  # killed before the first checkpoint: start again from step 0 in the same directory
            self.log(f"--resume: no complete checkpoint in {self.run.checkpoints} yet; training starts again from step 0")
            return 0
        meta = checkpoint.check_compatible(ckpt, self.data.fingerprint, self.batcher.signature())
        checkpoint.load(self.accel, ckpt)
        self.guard.restore(meta)
        self.log(f"resumed from {ckpt} (step {meta['step']})")
        return meta["step"]

    def _write_run_files(self) -> None:
        if self.accel.is_main_process:
            self.run.write_config(self.cfg)
            self.run.write_json(self.run.data_report, self.data.report)
            # A few token sequences kept with the run so `merge` can check parity from the directory alone.
            self.run.write_json(self.run.parity_samples, [s.input_ids for s in (self.data.eval or self.data.train)[:4]])
            self.run.start(
                recipe=self.name, finetune=self.cfg.train.finetune, base_model=self.cfg.model.model_dump(),
                base_model_dir=self.source, data_fingerprint=self.data.fingerprint, versions=versions(),
                total_steps=self.total_steps, processes=self.accel.num_processes, packing=self.data.report.get("packing"),
            )
        self.started = True

    # ---- the recipe's batch and loss ----------------------------------------------------------------
    def collate(self, micro) -> dict:
        from tuneforge.data.collate import collate
        from tuneforge.train.step import to_device

        return to_device(collate(micro.rows, self.tokenizer.pad_token_id, self.packed), self.accel.device)

    def loss(self, model, batch, label_smoothing: float | None = None):
        """Summed masked cross-entropy (label smoothing while training; eval passes 0: the plain CE)."""
        from tuneforge.train.loss import token_loss

        smoothing = self.cfg.train.label_smoothing if label_smoothing is None else label_smoothing
        return token_loss(model, batch, self.cfg.train.loss_kernel, smoothing)

    @staticmethod
    def count(batch) -> int:
        from tuneforge.train.loss import count_targets

        return count_targets(batch)

    # ---- train ------------------------------------------------------------------------------------
    def backward_step(self, step: int) -> dict:
        """Forward + backward over this process's micro-batches of `step`; grads hold d(loss)/d(params) after."""
        from tuneforge.train.loss import real_tokens
        from tuneforge.train.step import accumulate

        sb = self.batcher.step(step, self.accel.process_index)
        batches = [self.collate(mb) for mb in sb.micro]
        return {**accumulate(self.accel, self.model, batches, self.loss, self.count, real_tokens), "epoch": sb.epoch}

    def train(self) -> dict:
        from tuneforge.train.engine import generate_eval, update_bar
        from tuneforge.train.engine import generate_eval, update_bar
        from tuneforge.train.step import update
        from tuneforge.train.flops import mfu
        from tuneforge.train.tracking import Tracker, progress_bar

        t = self.cfg.train
        self.tracker = Tracker(self.run.root, self.cfg.tracking.tensorboard, enabled=self.accel.is_main_process,
                               tracking=self.cfg.tracking, config=self.cfg.model_dump(mode="json"))
        if self.resume:
            self.tracker.truncate_after(self.start_step)
        if self.start_step == 0 and t.generate_eval.samples:
            generate_eval(self, step=0, tag="before")
        self.model.train()
        last = {}
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
                update_bar(bar, done, self.total_steps, last, self.log)
                best = early = None
                if t.eval_every and done % t.eval_every == 0 and done != self.total_steps:
                    eval_loss = self.eval_loss()
                    self.tracker.log(done, eval_loss=eval_loss)
                    best, early = self.guard.after_eval(done, eval_loss)
                if (t.save_every and done % t.save_every == 0) or signalled or early or (best and t.keep_best):
                    self._save_checkpoint(done, best=bool(best))
                if signalled:
                    self.guard.interrupt(done)  # status interrupted, exit 130; --resume continues
                if early:
                    self.log(early)
                    break
        return self.guard.loop_done(last)

    def eval_loss(self) -> float:
        """Cross-entropy per target token over the whole eval split, sharded across processes."""
        from tuneforge.data.batcher import eval_batches
        from tuneforge.train.step import evaluate

        mine = eval_batches(self.data.eval, self.cfg.train.micro_batch_size, self.accel.process_index,
                            self.accel.num_processes, layout="packed" if self.cfg.data.packing == "padding_free" else "rows")
        plain_ce = lambda model, batch: self.loss(model, batch, label_smoothing=0.0)  # noqa: E731
        return evaluate(self.accel, self.model, [(self.collate(mb), mb.dummy) for mb in mine], plain_ce, self.count)

    def _save_checkpoint(self, step: int, best: bool = False) -> None:
        from tuneforge.train import checkpoint

        meta = {"data_fingerprint": self.data.fingerprint, "batching": self.batcher.signature(), **self.guard.state()}
        path = checkpoint.save(self.accel, self.run, step, meta, self.cfg.train.keep_checkpoints)
        if self.accel.is_main_process:
            self.run.update(last_checkpoint=str(path), step=step)
        self.guard.checkpointed(step, path, best)  # best copy, report.html refreshed

    # ---- save -------------------------------------------------------------------------------------
    def save(self, last: dict) -> dict:
        from tuneforge.train.engine import generate_eval, generate_eval_before, save_final
        from tuneforge.train.tracking import plot_loss

        summary = {"final_loss": last.get("loss"), "steps": self.total_steps}
        if self.data.eval:
            summary["eval_loss"] = self.eval_loss()
            self.tracker.log(self.total_steps, eval_loss=summary["eval_loss"])
        if self.cfg.train.generate_eval.samples:
            summary["generate_eval_after"] = generate_eval(self, self.total_steps, "after")
        save_final(self.accel, self.model, self.tokenizer, self.run.final)  # collective: gathers sharded weights
        if self.accel.is_main_process:
            self.tracker.close()
            if self.cfg.tracking.plot:
                plot_loss(self.run.root)
            if generate_eval_before(self.run):
                summary["generate_eval_before"] = generate_eval_before(self.run)
            self.run.finish(final_dir=str(self.run.final), summary=summary)
        return summary


def recipe_for(cfg: Config) -> type:
    """train.method -> its recipe class."""
    if cfg.train.method == "sft":
        return SFTRecipe
    from tuneforge.train.dpo import RECIPES

    return RECIPES[cfg.train.method]


def run(cfg: Config, resume: bool = False, log=print, recipe_cls=None) -> dict:
    """Run a recipe (train.method's, unless given); a run that dies ends `failed` (or `interrupted`) with the
    one-line reason in run_info.json."""
    recipe = (recipe_cls or recipe_for(cfg))(cfg, resume=resume, log=log)
    try:
        recipe.setup()
        return recipe.save(recipe.train())
    except BaseException as exc:
        from tuneforge.train.engine import record_failure

        record_failure(recipe, exc)
        raise
    finally:
        recipe.guard.close()  # report.html, lock released, signal handlers restored
