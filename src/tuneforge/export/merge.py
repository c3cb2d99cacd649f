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
from tuneforge.rundir import update_run_info, write_json

DTYPES = ("float32", "bfloat16", "float16")
# Half-precision saves round every weight: parity is checked relative to the largest |logit| instead.
REL_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3}
# The reference of a QLoRA merge runs bitsandbytes' 4-bit kernels, whose sums differ from a dense fp32 matmul.
QUANTIZED_REL_TOLERANCE = 1e-2


def merge(path: str, out: str | None = None, tolerance: float = 1e-3, log=print, overwrite: bool = False,
          dtype: str = "float32", max_shard_size: str = "5GB") -> dict:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    out_dir = Path(out) if out else Path(path) / "merged"
    # The default RUN_DIR/merged is the run's own artifact: re-merging replaces it. Elsewhere, only with --overwrite.
    check_output_dir(out_dir, "merged", overwrite or out is None, "--overwrite")

    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.export import parity

    model, tokenizer, desc, quantized = load_for_merge(path, log)
    samples = sample_ids(Path(path), tokenizer)
    # De-quantize before any forward: on CPU, bitsandbytes repacks 4-bit weights at the first eval forward.
    weights = dequantized_weights(model) if quantized else None
    adapter_logits = parity.logits(model, samples)
    if quantized:
        model = with_weights(weights, desc)
        log(f"merging into the de-quantized base (the adapter was trained on a {quantized} base; the merged weights are full precision)")
    merged = model.merge_and_unload().to(getattr(torch, dtype))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mark_output_dir(tmp, "merged", source=str(path))
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    write_generation_config(tmp, tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    report = {**parity.compare(adapter_logits, parity.logits(reloaded, samples)), "dtype": dtype, "tolerance": tolerance,
              "base_dequantized_from": quantized, "shards": len(list(tmp.glob("*.safetensors")))}
    report["passed"] = why(report) is None
    write_json(tmp / "merge_report.json", report)
    from tuneforge.export.card import write_card

    notes = [f"LoRA merged into the de-quantized {quantized} base it was trained on."] if quantized else []
    write_card(tmp, Path(path), "merged", {k: report[k] for k in ("max_abs_logit_diff", "max_rel_logit_diff", "top1_agreement", "dtype")}, notes)
    clear_output_dir(out_dir, "merged")
    tmp.rename(out_dir)
    if (Path(path) / "run_info.json").is_file():
        update_run_info(Path(path), merged_dir=str(out_dir), merge=report)
    if not report["passed"]:
        raise ParityError(f"merged model differs from the adapter model: {why(report)} (see {out_dir}/merge_report.json)")
    return {**report, "out": str(out_dir)}


def why(report: dict) -> str | None:
    if report["base_dequantized_from"]:
        if report["max_rel_logit_diff"] > QUANTIZED_REL_TOLERANCE:
            return f"max relative |logit diff| {report['max_rel_logit_diff']:.3g} > {QUANTIZED_REL_TOLERANCE:g} (quantized base)"
        return None
    if report["dtype"] == "float32":
        if report["max_abs_logit_diff"] > report["tolerance"]:
            return f"max |logit diff| {report['max_abs_logit_diff']:.3g} > tolerance {report['tolerance']:g}"
        return None
    limit = REL_TOLERANCE[report["dtype"]]
    if report["max_rel_logit_diff"] > limit:
        return f"max relative |logit diff| {report['max_rel_logit_diff']:.3g} > {limit:g} for {report['dtype']}"
    return None


def load_for_merge(path: str, log=print):
    """-> (adapter model in fp32 compute, tokenizer, description, '4bit'/'8bit' if the base was quantized in training)."""
    from tuneforge.model.trained import describe, load_trained

    desc = describe(path)
    if desc["kind"] != "lora":
        raise UserError(f"{path}: nothing to merge (a {desc['kind']} model has no adapter); use it directly")
    from tuneforge.export.card import run_facts

    base_cfg = run_facts(Path(path)).get("base_model") or {}
    quantized = base_cfg.get("quantize") if isinstance(base_cfg, dict) else None
    if not quantized:
        model, tokenizer, desc = load_trained(path, dtype="float32")
        return model, tokenizer, desc, None
    from peft import PeftModel

    from tuneforge.config.schema import ModelConfig
    from tuneforge.model.load import load_model, load_tokenizer, weights_error

    cfg = ModelConfig(**{**base_cfg, "dtype": "float32", "compute_dtype": "float32"})
    tokenizer = load_tokenizer(str(desc["weights"]))
    base = load_model(desc["base"], cfg)
    try:
        model = PeftModel.from_pretrained(base, str(desc["weights"]))
    except Exception as exc:  # noqa: BLE001 - a corrupt adapter file is a user error; anything else re-raises
        raise weights_error(desc["weights"], exc) from None
    return model.eval(), tokenizer, desc, quantized


def dequantized_weights(model) -> dict:
    """{module name in the base: fp32 (out, in) weight} for every bitsandbytes layer of the adapter model."""
    from peft.utils.integrations import dequantize_module_weight

    return {name.removeprefix("base_model.model.").removesuffix(".base_layer"): dequantize_module_weight(module).float()
            for name, module in model.named_modules() if type(module).__module__.startswith("bitsandbytes")}


def with_weights(weights: dict, desc: dict):
    """The same adapter on a fresh fp32 base whose quantized linears hold their de-quantized weights."""
    from peft import PeftModel

    from tuneforge.model.load import load_model

    base = load_model(desc["base"], dtype="float32")
    for name, w in weights.items():
        base.get_submodule(name).weight.data = w
    return PeftModel.from_pretrained(base, str(desc["weights"])).eval()


def write_generation_config(folder: Path, tokenizer) -> None:
    """eos_token_id = every stop token of the chat template, so plain `generate` ends the turn where training did."""
    from transformers import GenerationConfig

    from tuneforge.data.templates import stop_token_ids

    stops = stop_token_ids(tokenizer)
    GenerationConfig(eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)

