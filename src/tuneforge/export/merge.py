"""Merge a LoRA adapter into full weights and prove the merged model matches the adapter model.

The merged directory is reloaded with plain transformers (no tuneforge, no peft) before comparing,
so the check covers what a user will actually load. It holds sharded safetensors, the tokenizer with
the training chat template, a generation_config whose eos_token_id lists the template's stop tokens
(so `model.generate` stops at end of turn without tuneforge), and a model card.

A QLoRA adapter was trained against the 4-bit base; it is merged into that base *de-quantized*
(the weights the adapter actually saw), not into the original full-precision checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tuneforge.errors import ParityError, UserError
from tuneforge.export.parity import sample_ids
from tuneforge.outputs import check_output_dir, clear_output_dir, mark_output_dir
from tuneforge.rundir import RunDir, update_run_info, write_json

DTYPES = ("float32", "bfloat16", "float16")
ABS_TOLERANCE = 1e-3  # float32: max |logit diff|
# Half-precision saves round every weight: parity is checked relative to the largest |logit| instead.
REL_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3}
# The reference of a QLoRA merge runs bitsandbytes' 4-bit kernels, whose sums differ from a dense fp32 matmul.
QUANTIZED_REL_TOLERANCE = 1e-2
CHECKS = {"max_abs_logit_diff": "max |logit diff|", "max_rel_logit_diff": "max relative |logit diff|"}


def merge(path: str, out: str | None = None, tolerance: float | None = None, log=print, overwrite: bool = False,
          dtype: str = "float32", max_shard_size: str = "5GB") -> dict:
    """Merge a run dir, a bare adapter dir or a checkpoint folder of a LoRA run (RUN/checkpoints/step-N)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    source = Path(path)
    run_of_checkpoint = checkpoint_run(source)
    facts = run_of_checkpoint or source  # where run_info, parity samples and held-out prompts live
    # Defaults are the run's own artifacts (RUN/merged, RUN/merged-step-N): re-merging replaces them. Elsewhere, only with --overwrite.
    out_dir = Path(out) if out else (facts / f"merged-{source.name}" if run_of_checkpoint else source / "merged")
    check_output_dir(out_dir, "merged", overwrite or out is None, "--overwrite")
    if run_of_checkpoint is None:
        return _merge(str(source), facts, out_dir, tolerance, dtype, max_shard_size, log)
    adapter = out_dir.with_name(out_dir.name + ".adapter.tmp")
    try:
        adapter_from_checkpoint(source, run_of_checkpoint, adapter, log)
        return _merge(str(adapter), facts, out_dir, tolerance, dtype, max_shard_size, log, label=str(source))
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def _merge(path: str, facts: Path, out_dir: Path, tolerance: float | None, dtype: str, max_shard_size: str, log,
           label: str | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.export import parity
    from tuneforge.progress import phase

    with phase("merge", total=5, log=log) as progress:
        model, tokenizer, desc, quantized = load_for_merge(path, log, facts)
        samples = sample_ids(facts, tokenizer)
        # De-quantize before any forward: on CPU, bitsandbytes repacks 4-bit weights at the first eval forward.
        weights = dequantized_weights(model) if quantized else None
        from tuneforge.train.core.step import eval_mode

        with eval_mode(model):  # CPU 4-bit layers stay unrepacked: the reference computes on the de-quantized weights
            adapter_logits = parity.logits(model, samples)
        progress.advance(note="adapter model loaded")
        if quantized:
            model = with_weights(weights, desc, tokenizer)
            log(f"merging into the de-quantized base (the adapter was trained on a {quantized} base; the merged weights are full precision)")
        merged = model.merge_and_unload().to(getattr(torch, dtype))
        progress.advance(note="fused")
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        mark_output_dir(tmp, "merged", source=label or path)
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        write_generation_config(tmp, tokenizer)
        progress.advance(note="saved")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        progress.advance(note="reloaded")
        check, limit = applied_check(dtype, quantized, tolerance)
        report = {**parity.compare(adapter_logits, parity.logits(reloaded, samples)), "dtype": dtype, "check": check,
                  "tolerance": limit, "base_dequantized_from": quantized, "shards": len(list(tmp.glob("*.safetensors")))}
        progress.advance(note="compared")
    report["passed"] = why(report) is None
    if label:
        report["checkpoint"] = label
    write_json(tmp / "merge_report.json", report)
    from tuneforge.export.card import write_card

    notes = [f"LoRA merged into the de-quantized {quantized} base it was trained on."] if quantized else []
    notes += [f"Merged from the training checkpoint {Path(label).name}."] if label else []
    write_card(tmp, facts, "merged", {k: report[k] for k in ("max_abs_logit_diff", "max_rel_logit_diff", "top1_agreement", "dtype")}, notes)
    clear_output_dir(out_dir, "merged")
    tmp.rename(out_dir)
    if RunDir(facts).exists() and not label:  # a checkpoint's merge is not the run's merge
        update_run_info(facts, merged_dir=str(out_dir), merge=report)
    if not report["passed"]:
        raise ParityError(f"merged model differs from the adapter model: {why(report)} (see {out_dir}/merge_report.json)")
    return {**report, "out": str(out_dir)}


def checkpoint_run(path: Path) -> Path | None:
    """RUN when `path` is a complete checkpoint folder `train` wrote (RUN/checkpoints/step-N), else None."""
    path = path.resolve()
    run = RunDir(path.parent.parent)
    if path in run.complete_checkpoints() and run.config.is_file():
        return run.root
    return None


def adapter_from_checkpoint(ckpt: Path, run_dir: Path, folder: Path, log) -> None:
    """Write a checkpoint's LoRA weights as a peft adapter folder with the run's tokenizer: the adapter is rebuilt
    from the run's saved config (base, lora section, added tokens), then holds exactly the checkpoint's tensors."""
    import yaml

    from tuneforge.config.schema import Config
    from tuneforge.model.adapters import add_lora, embedding_modules, resize_embeddings
    from tuneforge.model.load import load_model, load_tokenizer, resolve_model_dir
    from tuneforge.train.core.checkpoint import copy_trainable

    cfg = Config(**yaml.safe_load(RunDir(run_dir).config.read_text()))
    if cfg.train.finetune != "lora":
        raise UserError(f"{ckpt}: a train.finetune: {cfg.train.finetune} checkpoint has no adapter to merge (its weights "
                        "are the model's own; resume the run to finish it)")
    weights = checkpoint_weights(ckpt)
    base_dir = resolve_model_dir(cfg.model, log)
    tokenizer = load_tokenizer(base_dir, cfg.model)
    base = load_model(base_dir, dtype="float32")  # the adapter's tensors do not depend on the base's quantization
    resized = resize_embeddings(base, tokenizer)
    model = add_lora(base, cfg.lora, embedding_modules(base) if resized else [])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    copy_trainable(params, weights, f"{ckpt}: its weights do not match the run's LoRA settings in {RunDir(run_dir).config}",
                   "merge the checkpoint of this run's config")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log(f"adapter rebuilt from checkpoint {ckpt.name} ({len(weights)} tensors) on {base_dir}")


def checkpoint_weights(ckpt: Path) -> dict:
    """{trainable parameter name: tensor} of a checkpoint: one process / DDP (model.safetensors) or DeepSpeed ZeRO."""
    from tuneforge.train.core.checkpoint import plain

    def plain_name(key: str) -> str:  # the name in the model, without compile's or DDP's wrapper prefix
        return plain(key).removeprefix("module.")

    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return {plain_name(k): v for k, v in load_file(ckpt / "model.safetensors").items()}
    if (ckpt / "latest").is_file():  # accelerate + DeepSpeed: the engine's shards, consolidated to fp32 on CPU
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise UserError(f"{ckpt}: a DeepSpeed checkpoint, and DeepSpeed is not installed here "
                            "(pip install 'tuneforge[deepspeed]' to merge it)") from None

        return {plain_name(k): v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), exclude_frozen_parameters=True).items()}
    raise UserError(f"{ckpt}: no weights merge can read (model.safetensors, or DeepSpeed shards with a 'latest' file); an FSDP "
                    "checkpoint is merged after the run finishes (`tuneforge merge RUN`)")


def applied_check(dtype: str, quantized: str | None, tolerance: float | None) -> tuple[str, float]:
    """-> (the report number compared, its limit): absolute for a float32 merge, relative to the largest |logit| for
    half-precision weights or a de-quantized base (a user's --tolerance replaces the default of that check)."""
    if dtype == "float32" and not quantized:
        return "max_abs_logit_diff", ABS_TOLERANCE if tolerance is None else tolerance
    default = max(REL_TOLERANCE.get(dtype, 0.0), QUANTIZED_REL_TOLERANCE if quantized else 0.0)
    return "max_rel_logit_diff", default if tolerance is None else tolerance


def verdict(report: dict) -> str:
    """The compared number against its limit, as printed and as judged: `max |logit diff| 2.1e-05 <= 0.001`."""
    value = report[report["check"]]
    return f"{CHECKS[report['check']]} {value:.2e} {'<=' if why(report) is None else '>'} {report['tolerance']:g} ({report['dtype']}" + \
        (f", de-quantized {report['base_dequantized_from']} base)" if report["base_dequantized_from"] else ")")


def why(report: dict) -> str | None:
    value = report[report["check"]]
    if value <= report["tolerance"]:  # NaN compares False: a NaN difference fails
        return None
    return f"{CHECKS[report['check']]} {value:.3g} > tolerance {report['tolerance']:g} for a {report['dtype']} merge" + \
        (f" into a de-quantized {report['base_dequantized_from']} base" if report["base_dequantized_from"] else "")


def load_for_merge(path: str, log=print, facts: Path | None = None):
    """-> (adapter model in fp32 compute, tokenizer, description, '4bit'/'8bit' if the base was quantized in training).
    `facts`: the run folder whose run_info tells how the base was loaded (default: `path` itself)."""
    from tuneforge.model.trained import describe, load_trained

    desc = describe(path)
    if desc["kind"] != "lora":
        raise UserError(f"{path}: nothing to merge (a {desc['kind']} model has no adapter); use it directly")
    from tuneforge.export.card import run_facts

    base_cfg = run_facts(Path(facts or path)).get("base_model") or {}
    quantized = base_cfg.get("quantize") if isinstance(base_cfg, dict) else None
    if not quantized:
        model, tokenizer, desc = load_trained(path, dtype="float32")
        return model, tokenizer, desc, None
    from tuneforge.config.schema import ModelConfig
    from tuneforge.model.load import load_tokenizer

    cfg = ModelConfig(**{**base_cfg, "dtype": "float32", "compute_dtype": "float32"})
    tokenizer = load_tokenizer(str(desc["weights"]))
    return _adapter_on(_base(desc, tokenizer, cfg), desc), tokenizer, desc, quantized


def _base(desc: dict, tokenizer, cfg=None):
    """The base model, its embeddings grown to the trained tokenizer when training added tokens (the adapter holds
    those rows: without this, loading it fails with a size mismatch)."""
    from tuneforge.model.load import load_model

    base = load_model(desc["base"], cfg, dtype="float32")
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    return base


def _adapter_on(base, desc: dict):
    from peft import PeftModel

    from tuneforge.model.load import weights_error

    try:
        return PeftModel.from_pretrained(base, str(desc["weights"])).eval()
    except Exception as exc:  # noqa: BLE001 - a corrupt adapter file is a user error; anything else re-raises
        raise weights_error(desc["weights"], exc) from None


def dequantized_weights(model) -> dict:
    """{parameter name in the base: fp32 weight} for every bitsandbytes layer ((out, in)) and 4-bit MoE experts
    ([E, out, in], model/moe.py) of the adapter model."""
    from peft.utils.integrations import dequantize_module_weight

    from tuneforge.model.moe import dequantized_experts

    linear = {name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight": dequantize_module_weight(module).float()
              for name, module in model.named_modules() if type(module).__module__.startswith("bitsandbytes")}
    return {**linear, **dequantized_experts(model, "base_model.model.")}


def with_weights(weights: dict, desc: dict, tokenizer):
    """The same adapter on a fresh fp32 base whose quantized weights hold their de-quantized values."""
    base = _base(desc, tokenizer)
    for name, w in weights.items():
        base.get_parameter(name).data = w
    return _adapter_on(base, desc)


def write_generation_config(folder: Path, tokenizer) -> None:
    """eos_token_id = every stop token of the chat template, so plain `generate` ends the turn where training did."""
    from transformers import GenerationConfig

    from tuneforge.data.templates import stop_token_ids

    stops = stop_token_ids(tokenizer)
    GenerationConfig(eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)

