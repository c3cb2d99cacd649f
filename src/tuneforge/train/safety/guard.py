"""Everything that keeps a run safe and visible, around any recipe's loop, in one object.

    guard = RunGuard(cfg, run, resume, log)      # in __init__: cheap checks, before anything heavy
    guard.acquire(accel)                         # after the run dir exists: lock (main process), signals, GPU plan
    guard.preflight(model)                       # after the model is built: disk space for the checkpoints
    guard.restore(meta)                          # on resume: the watchdog's state from trainer.json
    guard.before_step(step, model); guard.measure(metrics)   # fault hook; peak memory
    stop = guard.after_step(step, metrics)       # NaN/divergence -> Diverged; SIGTERM/SIGINT -> "SIGTERM"
    stop = guard.after_eval(step, eval_loss)     # best checkpoint, early stopping -> "early stopping"
    guard.state()                                # what a checkpoint keeps (trainer.json)
    guard.checkpointed(step)                     # refresh report.html, copy the best checkpoint
    guard.close(status)                          # report.html, release the lock and signal handlers

The recipe decides what to do with a stop: finish the step, write a checkpoint, then `interrupt()`
(raises Interrupted, exit 130) or end normally (early stopping).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.train.safety.faults import fault_point, poison
from tuneforge.train.safety.signals import Interrupted, StopFlag
from tuneforge.train.safety.watchdog import Watchdog


class RunGuard:
    def __init__(self, cfg, run, resume: bool, log=print):
        from tuneforge.train.safety.lock import refuse_if_live
        from tuneforge.train.safety.preflight import check_writable

        self.cfg, self.run, self.resume, self.log = cfg, run, resume, log
        self.lock = None
        self.main = True
        self.watchdog = Watchdog.from_config(cfg.train)
        self.stop_flag = StopFlag()
        self.best_step: int | None = None
        self.stop_reason: str | None = None
        check_writable(run.root)
        refuse_if_live(run.root)  # never train into (or clear) a directory a live process trains in
        if resume:
            self._check_resume()

    # ---- before anything heavy -----------------------------------------------------------------------
    def _check_resume(self) -> None:
        from tuneforge.train.safety.resume_check import check_resume_config

        run, t = self.run, self.cfg.train
        if not run.exists():
            from tuneforge.outputs import artifact_kind

            if run.root.is_dir() and artifact_kind(run.root) == "run":
                return  # killed while starting up (no run_info.json yet): resuming starts at step 0
            raise UserError(f"--resume: {run.root} holds no run to resume (start it without --resume)")
        info = run.info()
        latest = run.latest_checkpoint()
        step = int(latest.name.split("-")[-1]) if latest else 0
        if info.get("status") == "finished" and (t.max_steps is None or t.max_steps <= int(info.get("total_steps") or 0)):
            raise UserError(f"--resume: {run.root} already finished ({info.get('total_steps')} steps); to train longer "
                            "raise train.max_steps and --resume, or start a new run in another output.dir")
        changed = check_resume_config(run.root, self.cfg.model_dump(mode="json"), resumed_step=step)
        if changed:
            self.log(f"resume: accepted config changes that do not alter the run: {', '.join(changed)}")

    def acquire(self, accel) -> None:
        from tuneforge.train.safety.lock import RunLock

        from tuneforge.train.safety.preflight import check_plan_on_gpu

        self.main = accel.is_main_process
        if self.main:
            self.lock = RunLock(self.run.root, self.resume, log=self.log).acquire()
        self.stop_flag.install()  # from here on SIGTERM/SIGINT end the run with a checkpoint
        check_plan_on_gpu(self.cfg, self.log)

    def preflight(self, model) -> None:
        from tuneforge.train.safety.preflight import check_disk

        if self.main:
            t = self.cfg.train
            check_disk(self.run.root, model, t.keep_checkpoints + (1 if t.keep_best else 0), bool(t.save_every or t.saves_per_epoch or t.keep_best),
                       t.finetune != "lora")

    def restore(self, meta: dict | None) -> None:
        self.watchdog.load_state((meta or {}).get("watchdog"))
        self.best_step = self.watchdog.best_step

    # ---- in the loop ---------------------------------------------------------------------------------
    def before_step(self, step: int, model) -> None:
        """Test hook: TUNEFORGE_FAULT=nan@step:N puts a NaN into a trainable weight before step N, as a
        diverged run would (see train/faults.py)."""
        if poison(step):
            import torch

            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")

    def measure(self, metrics: dict) -> None:
        """Add the peak memory so far to a step's metrics (MFU comes from train/flops.py where the recipe logs it)."""
        from tuneforge.train.observe.tracking import peak_memory_gib

        metrics["peak_mem_gib"] = round(peak_memory_gib(), 3)

    def after_step(self, step: int, metrics: dict, accel=None) -> str | None:
        """After the step is logged: NaN/inf or divergence raises Diverged (no checkpoint of this step is
        written); returns the signal name when SIGTERM/SIGINT asked the run to stop."""
        fault_point("step", step)
        self.watchdog.check_step(step, metrics.get("loss"), metrics.get("grad_norm"))
        return self._signalled(accel)

    def loop_done(self, last: dict) -> dict:
        """After the loop: the last step's metrics, or the last logged ones when this invocation trained no
        step (a resume from a checkpoint at the final step, after a kill during the final save)."""
        from tuneforge.train.observe.tracking import read_metrics

        fault_point("final")
        if last:
            return last
        rows = [r for r in read_metrics(self.run.root) if r.get("loss") is not None]
        return rows[-1] if rows else {}

    def _signalled(self, accel) -> str | None:
        """The stop request, agreed by every process (a scheduler may signal only some of them)."""
        asked = self.stop_flag.requested
        if accel is not None and accel.num_processes > 1:
            import torch

            flag = torch.tensor([1.0 if asked else 0.0], device=accel.device)
            asked = asked or ("SIGTERM" if accel.reduce(flag, reduction="sum").item() > 0 else None)
        self.stop_reason = asked or self.stop_reason
        return asked

    def after_eval(self, step: int, eval_loss: float) -> tuple[bool, str | None]:
        """(is_new_best, stop_reason)."""
        best, stop = self.watchdog.check_eval(step, eval_loss)
        if stop:
            self.stop_reason = (f"early stopping: eval loss has not improved for {self.watchdog.evals_without_gain} evals "
                                f"(best {self.watchdog.best_eval:.4f} at step {self.watchdog.best_step})")
            if self.main:
                self.run.update(stopped_early=self.stop_reason, stopped_at=step)
        return best, (self.stop_reason if stop else None)

    def state(self) -> dict:
        return {"watchdog": self.watchdog.state()}

    def checkpointed(self, step: int, path: Path, best: bool) -> None:
        """After a checkpoint is complete: keep a copy as the best one if asked, and refresh the report."""
        if not self.main:
            return
        if best and self.cfg.train.keep_best:
            dest = self.run.best
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            self.best_step = step
            self.run.update(best_checkpoint=str(dest), best_step=step, best_eval_loss=self.watchdog.best_eval)
        self.report()

    def interrupt(self, step: int) -> None:
        """After the checkpoint of `step` is written: record the interruption and leave (exit 130)."""
        reason = f"{self.stop_reason}: stopped after step {step} with a checkpoint; --resume continues"
        if self.main:
            self.run.interrupt(reason)
        raise Interrupted(reason)

    # ---- the end -------------------------------------------------------------------------------------
    def report(self) -> None:
        if not self.main:
            return
        try:
            from tuneforge.train.observe.report import write_report

            write_report(self.run.root)
        except OSError as exc:  # a report must never fail a run
            self.log(f"warning: report.html not written ({exc})")

    def close(self) -> None:
        self.report()
        self.stop_flag.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
