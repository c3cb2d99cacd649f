"""`tuneforge quantize --method gptq`: a GPTQ model that plain transformers loads, proven against the trained model.

GPTQ itself is GPTQModel's (ModelCloud), not ours. What tuneforge adds is what users lose elsewhere:
calibration on the run's own rendered training samples (the chat template and all, as the model saw
them in training), and a check of the result read back through transformers' own GPTQ loader —
perplexity on the run's eval split before and after, max |logit diff|, next-token agreement and
greedy answers on held-out prompts. A quantized model whose perplexity rises more than the allowed
share fails loudly (exit 3); the numbers land in quantize_report.json, the model card and run_info.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.outputs import check_output_dir, mark_output_dir
from tuneforge.rundir import RunDir, write_json

METHODS = ("gptq",)
BITS = (4, 8)
GROUP_SIZES = (-1, 32, 64, 128, 256)  # what GPTQ kernels run (torch's CPU int4 kernel: 32-256)
CPU_INT4_MAX_GROUP = 256
# Perplexity may rise by this share at most (4-bit GPTQ on real models usually stays within a few percent).
MAX_PPL_INCREASE = 0.25
# Held-out greedy answers that must equal the trained model's (quantized: some drift is expected).
MIN_ANSWER_AGREEMENT = 0.5
INSTALL_HINT = "pip install 'tuneforge[gptq]'"


def quantize(path: str, out: str | None = None, method: str = "gptq", bits: int = 4, group_size: int = 128,
             calibration: str | None = None, samples: int = 128, max_ppl_increase: float = MAX_PPL_INCREASE,
             overwrite: bool = False, seed: int = 0, log=print) -> dict:
    check_options(method, bits, group_size)
    run_dir = Path(path)
    check_inputs(run_dir, calibration)
    out_dir = Path(out) if out else run_dir / f"gptq-{bits}bit"
    # The default RUN_DIR/gptq-Nbit is the run's own artifact: quantizing again replaces it. Elsewhere only with --overwrite.
    check_output_dir(out_dir, "gptq", overwrite or out is None, "--overwrite")
    gptqmodel_version()  # fail before loading anything when the library is missing

    from tuneforge.progress import phase

    with phase(f"quantize gptq {bits}-bit", total=3, log=log) as progress:  # reference, quantize, read back
        return _quantize(path, run_dir, out_dir, method, bits, group_size, calibration, samples, max_ppl_increase, seed, log, progress)


def _quantize(path, run_dir: Path, out_dir: Path, method, bits, group_size, calibration, samples, max_ppl_increase, seed, log,
              progress) -> dict:
    from tuneforge.export import parity

    model, tokenizer, desc = load_source(path, log)
    check_group_size(model, group_size, bits)
    calib, evals, calib_source = calibration_data(run_dir, tokenizer, calibration, samples, seed, log)
    ids = parity.sample_ids(run_dir, tokenizer)
    prompts = parity.held_out_prompts(run_dir)
    before = {"logits": parity.logits(model, ids), "answers": parity.greedy(model, tokenizer, prompts),
              "perplexity": parity.target_perplexity(model, evals)}
    progress.advance(note="reference numbers")
    if desc["kind"] == "lora":
        model = model.merge_and_unload()  # GPTQ quantizes full weights: the adapter is fused first

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    source = out_dir.with_name(out_dir.name + ".source.tmp")
    for folder in (tmp, source):
        shutil.rmtree(folder, ignore_errors=True)
    try:  # the full-precision copy GPTQModel reads is as large as the model: never left behind
        model.cpu().save_pretrained(source, safe_serialization=True)
        tokenizer.save_pretrained(source)
        del model
        log(f"GPTQ {bits}-bit, group size {group_size}: {len(calib)} calibration samples from {calib_source}")
        run_gptq(source, tmp, bits, group_size, calib)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    progress.advance(note="quantized")
    mark_output_dir(tmp, "gptq", source=str(run_dir), bits=bits)
    tokenizer.save_pretrained(tmp)  # the training tokenizer and chat template, not the library's copy
    from tuneforge.export.merge import write_generation_config

    write_generation_config(tmp, tokenizer)

    report = {"method": method, "bits": bits, "group_size": group_size, "library": f"gptqmodel {gptqmodel_version()}",
              "calibration": {"source": calib_source, "samples": len(calib), "tokens": sum(len(c["input_ids"]) for c in calib)},
              **readback(tmp, tokenizer, ids, prompts, evals, before)}
    report["max_ppl_increase"] = max_ppl_increase
    progress.advance(note="read back")
    report["passed"] = failure(report) is None
    write_json(tmp / "quantize_report.json", report)
    from tuneforge.export.card import write_card

    keys = ("perplexity_before", "perplexity_after", "max_abs_logit_diff", "top1_agreement", "answer_agreement")
    write_card(tmp, run_dir, f"gptq {bits}-bit", {k: report[k] for k in keys},
               [f"Quantized with GPTQ ({report['library']}), {bits}-bit, group size {group_size}, on {len(calib)} "
                f"samples of {calib_source}. Load with transformers + `pip install gptqmodel optimum`."])
    parity.publish(tmp, out_dir, run_dir, kind="gptq", info_key=f"gptq_{bits}bit", report=report, report_file="quantize_report.json",
                   what="GPTQ model", failure=failure(report))
    return {**report, "out": str(out_dir)}


def check_options(method: str, bits: int, group_size: int) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method}: use one of {', '.join(METHODS)} (GGUF files are `tuneforge export --format gguf`)")
    if bits not in BITS:
        raise UserError(f"--bits {bits}: use one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size}: use 32, 64, 128 or 256 (or -1 for one group per row)")


def check_group_size(model, group_size: int, bits: int) -> None:
    """Every quantized linear needs whole groups that its kernel runs: GPTQ kernels refuse them only at inference."""
    import torch

    sizes = {m.in_features for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and "lm_head" not in name and "lora_" not in name}
    if group_size == -1:
        if bits == 4 and not torch.cuda.is_available() and max(sizes) > CPU_INT4_MAX_GROUP:
            raise UserError(f"--group-size -1 with --bits 4: one group per row means groups of {max(sizes)} weights, and "
                            f"torch's CPU int4 kernel runs at most {CPU_INT4_MAX_GROUP} (use --group-size 128, or a GPU)")
        return
    bad = sorted(s for s in sizes if s % group_size)
    if bad:
        common = math.gcd(*sizes)
        fit = max((g for g in GROUP_SIZES if g > 0 and common % g == 0), default=-1)
        raise UserError(f"--group-size {group_size}: does not divide this model's layer input size {bad[0]} (GPTQ kernels "
                        f"need whole groups); use --group-size {fit}")


def check_inputs(run_dir: Path, calibration: str | None) -> None:
    """What to quantize and what to calibrate on, checked before anything heavy is imported."""
    from tuneforge.model.trained import describe

    describe(run_dir)  # one line when the path is not a run, adapter or model directory
    if calibration and not Path(calibration).is_file():
        raise UserError(f"--calibration {calibration}: file not found (a jsonl/json/csv/parquet of chat or prompt/completion rows)")
    if not calibration and not RunDir(run_dir).config.is_file():
        raise UserError(f"{run_dir}: not a run directory with its config.yaml, so there is no training data to "
                        "calibrate on (pass --calibration FILE: a jsonl of chat or prompt/completion rows)")


def gptqmodel_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gptqmodel")
    except PackageNotFoundError:
        raise UserError(f"quantize --method gptq needs GPTQModel, which is not installed ({INSTALL_HINT})") from None


def load_source(path: str, log):
    """The trained model in fp32; a QLoRA adapter sits on its de-quantized 4-bit base, as `merge` fuses it."""
    from tuneforge.export.merge import dequantized_weights, load_for_merge, with_weights
    from tuneforge.model.trained import describe, load_trained

    if describe(path)["kind"] != "lora":
        return load_trained(path, dtype="float32")
    model, tokenizer, desc, quantized = load_for_merge(path, log)
    if quantized:  # de-quantize before any forward: on CPU bitsandbytes repacks 4-bit weights at the first one
        model = with_weights(dequantized_weights(model), desc, tokenizer)
        log(f"the adapter was trained on a {quantized} base: it is fused into that base de-quantized, then GPTQ-quantized")
    return model, tokenizer, desc


def calibration_data(run_dir: Path, tokenizer, calibration: str | None, n: int, seed: int, log):
    """-> (calibration samples as GPTQModel takes them, eval (ids, labels) items for perplexity, where they came from).

    Default: the run's own data, rendered by the data layer exactly as training saw it; its eval split
    scores perplexity. With --calibration FILE, that file (any supported row format) with 10% held out.
    """
    from tuneforge.config.schema import DataConfig, DatasetSpec
    from tuneforge.data.prepare import prepare
    from tuneforge.rundir import saved_data_config

    if calibration:
        data_cfg, source = DataConfig(train=[DatasetSpec(path=str(calibration))], eval_split=0.1), str(calibration)
    else:
        data_cfg, source = saved_data_config(run_dir), "the run's training data"
    data = prepare(data_cfg, tokenizer, log=log)
    train = [s for s in data.train if len(s.input_ids) >= 2]
    if not train:
        raise UserError(f"{source}: no usable samples for calibration (need rows with text)")
    picked = random.Random(seed).sample(train, min(n, len(train)))
    calib = [{"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids)} for s in picked]
    evals = [(s.input_ids, s.labels) for s in (data.eval or picked[:8])]
    return calib, evals, source


def run_gptq(source: Path, out: Path, bits: int, group_size: int, calib: list[dict]) -> None:
    import os

    # GPTQModel sizes its CPU pool as cores // 2, but its model loader asks for 2 workers: on a 2-core
    # machine that refuses to start ("requests 2 workers but parent 'cpu' only has 1"). Its own env knob.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    from gptqmodel import GPTQModel, QuantizeConfig

    # offload_to_disk=False: the whole model is already in memory here; GPTQModel's disk offload made a
    # tiny model take 40 s instead of 1 s on CPU (measured), for no memory saved.
    # act_group_aware (GPTQModel's default) reorders within groups; with one group per row (-1) it is refused.
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, offload_to_disk=False,
                            act_group_aware=group_size > 0)
    model = GPTQModel.load(str(source), config)
    model.quantize(calib, batch_size=1, calibration_data_min_length=2)
    model.save(str(out))


def readback(folder: Path, tokenizer, ids, prompts, evals, before: dict) -> dict:
    """Load the GPTQ folder with plain transformers (its GPTQ backend) and compare with the trained model."""
    from transformers import AutoModelForCausalLM

    from tuneforge.export import parity
    from tuneforge.model.trained import to_best_device

    model = to_best_device(AutoModelForCausalLM.from_pretrained(folder)).eval()
    answers = parity.greedy(model, tokenizer, prompts)
    after = parity.target_perplexity(model, evals)
    return {**parity.compare(before["logits"], parity.logits(model, ids)), "dtype": str(model.dtype).removeprefix("torch."),
            "perplexity_before": before["perplexity"], "perplexity_after": after,
            "perplexity_increase": after / before["perplexity"] - 1.0,
            "answer_agreement": sum(a == b for a, b in zip(answers, before["answers"])) / max(1, len(answers)),
            "answers": [{"trained": a, "gptq": b} for a, b in zip(before["answers"], answers)]}


def failure(report: dict) -> str | None:
    if not math.isfinite(report["perplexity_after"]):
        return "perplexity after quantization is not finite"
    if report["perplexity_increase"] > report["max_ppl_increase"]:
        return (f"perplexity rose {report['perplexity_increase']:.1%} ({report['perplexity_before']:.4g} -> "
                f"{report['perplexity_after']:.4g}; allowed {report['max_ppl_increase']:.0%}, see --max-ppl-increase)")
    if report["answer_agreement"] < MIN_ANSWER_AGREEMENT:
        return f"greedy answers agree on {report['answer_agreement']:.0%} of held-out prompts (need {MIN_ANSWER_AGREEMENT:.0%})"
    return None
