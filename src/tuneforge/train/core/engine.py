"""What the training loop needs around it: the Accelerator, seeding, the final consolidated save, and the
run's end status when it dies. Engines (DDP, DeepSpeed, FSDP) plug in at `make_accelerator`."""

from __future__ import annotations

import random
import shutil
from pathlib import Path


def mixed_precision(cfg) -> str:
    import torch

    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cfg):
    import torch

    from tuneforge.train.core.engines import build_accelerator

    if cfg.train.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # step_scheduler_with_optimizer=False: our schedule counts optimizer steps; accelerate would otherwise
    # step it once per process per step (it assumes a dataloader sharded by world size).
    # dynamo_backend: accelerate compiles the model in prepare() and unwraps it for saving.
    # The engine (DDP, DeepSpeed ZeRO, FSDP2) is chosen from train.deepspeed / train.fsdp in train/engines.py.
    return build_accelerator(cfg, mixed_precision(cfg), step_scheduler_with_optimizer=False,
                             dynamo_backend="inductor" if cfg.train.compile else "no")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap(accel, model):
    """The trained module without its DDP / torch.compile wrappers. Only DeepSpeed and FSDP runs go through
    accelerate's unwrap_model: it imports DeepSpeed whenever DeepSpeed is installed (to test for its engine),
    and a plain run must not load an engine it did not ask for."""
    import torch
    from accelerate.utils import DistributedType, is_compiled_module

    if accel.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return accel.unwrap_model(model, keep_torch_compile=False)
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif is_compiled_module(model):
            model = model._orig_mod
        else:
            return model


def save_final(accel, model, tokenizer, final: Path) -> None:
    """Write a `save_pretrained` folder that plain transformers/peft load. Collective: every process calls it
    (ZeRO-3 / FSDP gather their shards in `get_state_dict`); the main process writes tmp -> rename."""
    from accelerate.utils import DistributedType

    sharded = accel.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    state = accel.get_state_dict(model) if sharded else unwrap(accel, model).state_dict()
    accel.wait_for_everyone()
    if accel.is_main_process:
        # train.compile: accelerate keeps the torch.compile wrapper, whose names start with `_orig_mod.`;
        # peft/transformers would match none of them (an empty adapter). Save the plain module's names.
        state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(accel, model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # with its chat template: inference renders like training
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accel.wait_for_everyone()


def record_failure(trainer, exc: BaseException) -> None:
    """Mark the run failed/interrupted with a one-line reason, if this invocation had started it."""
    if not getattr(trainer, "started", False):
        return  # refused before starting (bad config, resume mismatch): the run dir keeps its own status
    accel = getattr(trainer, "accel", None)
    if accel is not None and not accel.is_main_process:
        return
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM/SIGINT handled after a checkpoint (signals.Interrupted)
        trainer.run.interrupt(str(exc) or "interrupted (Ctrl-C)")
    elif isinstance(exc, SystemExit) and not exc.code:
        return
    else:
        trainer.run.fail(exc)


def update_bar(bar, done: int, total: int, m: dict, log, last_line: float) -> float:
    """Advance the live bar; without a terminal, log about ten progress lines per run, and one at least every
    PIPED_EVERY_S seconds (slow steps never look hung). Returns when the last line was logged."""
    import time

    from tuneforge.progress import PIPED_EVERY_S

    bar.update(bar.task_ids[0], completed=done, loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tps=f"{m['tokens_per_s']:.0f}")
    if not bar.live.is_started or bar.disable:
        now = time.monotonic()
        if done % max(1, total // 10) == 0 or done == total or now - last_line >= PIPED_EVERY_S:
            log(f"step {done}/{total}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s")
            return now
    return last_line


def generate_eval(trainer, step: int, tag: str) -> dict:
    """Greedy answers to held-out prompts, scored (exact / json), logged and written to the run dir."""
    from tuneforge.metrics import score
    from tuneforge.model.generate import generate_batch

    cfg, accel = trainer.cfg, trainer.accel
    g = cfg.train.generate_eval
    if tag == "before" and cfg.model.quantize == "4bit" and accel.device.type == "cpu":
        # Generation runs in eval mode, where bitsandbytes repacks 4-bit weights for CPU inference and
        # LoRA training on them goes wrong afterwards: only the after-training answers are scored.
        trainer.log("generate_eval: skipped before training (4-bit model on CPU); scored after training only")
        return {}
    convs = [s.messages for s in trainer.data.eval if isinstance(s.messages, list)][: g.samples]  # not corpus text
    last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in convs]
    prompts = [c[:i] for c, i in zip(convs, last)]
    refs = [c[i]["content"] for c, i in zip(convs, last)]
    from tuneforge.progress import phase

    model, chunk, preds = trainer.plain_model, 8, []
    # Each process generates for all prompts; only the main one shows progress (a bar, or a line every ~10 s piped).
    with phase(f"generate_eval ({tag})", total=len(prompts), log=trainer.log, tty=None if accel.is_main_process else False) as p:
        for i in range(0, len(prompts), chunk):
            preds += generate_batch(model, trainer.tokenizer, prompts[i : i + chunk], g.max_new_tokens, batch_size=chunk)
            p.advance(len(prompts[i : i + chunk]))
    result = score(preds, refs, g.metric)
    if accel.is_main_process:
        trainer.tracker.log(step, **{f"{k}_{tag}": v for k, v in result.items()})
        examples = [{"prompt": p[-1]["content"], "reference": r, "prediction": o} for p, r, o in zip(prompts, refs, preds)]
        trainer.run.write_json(trainer.run.generate_eval(tag), {"step": step, **result, "examples": examples})
    return result


def generate_eval_before(run) -> dict:
    """The before-training scores (gen_* keys) written at step 0, for the summary table."""
    import json

    path = run.generate_eval("before")
    return {k: v for k, v in json.loads(path.read_text()).items() if k.startswith("gen_")} if path.is_file() else {}
