"""quantize --method gptq: the GPTQ folder loads in plain transformers, its reported numbers are true, bad input is one line.

GPTQModel lives in its own venv (.venv-gptq, `make gptq-env`): once installed, peft imports it in every
LoRA load and it prints banners to stdout, so the main test venv stays without it. The quantize runs go
through that venv's `python -m tuneforge`; their results are checked from this one and by a script that
imports only transformers (no tuneforge) in the GPTQ venv.
"""

import json
import subprocess
from pathlib import Path

import pytest

import tiny
from helpers import assert_user_error, run_cli, write_config

GPTQ_PYTHON = Path(__file__).resolve().parents[1] / ".venv-gptq" / "bin" / "python"
needs_gptq_venv = pytest.mark.skipif(not GPTQ_PYTHON.is_file(), reason="no .venv-gptq (run `make gptq-env`; `make test` does)")

# Runs in the GPTQ venv with transformers only: what a user without tuneforge gets from the folder.
PLAIN_LOAD = """
import json, sys, torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
folder, samples = sys.argv[1], json.load(open(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder).eval()
with safe_open(folder + "/model.safetensors", "pt") as f:
    qweights = {k: str(f.get_tensor(k).dtype) for k in f.keys() if k.endswith(".qweight")}
with torch.no_grad():
    logits = [model(input_ids=torch.tensor([s]), use_cache=False).logits.float()[0].tolist() for s in samples]
quant = model.config.quantization_config
print(json.dumps({"quant": quant if isinstance(quant, dict) else quant.to_dict(), "qweights": qweights, "logits": logits,
                  "linear": type(model.model.layers[0].self_attn.q_proj).__name__, "tuneforge": "tuneforge" in sys.modules}, default=str))
"""


def gptq_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(GPTQ_PYTHON), "-m", "tuneforge", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd or Path.home())})


@pytest.mark.slow
@needs_gptq_venv
def test_gptq_8bit_loads_in_plain_transformers_and_its_numbers_are_true(learned_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    proc = gptq_cli("quantize", learned_run, "--bits", "8", "--group-size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    out = learned_run / "gptq-8bit"
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["passed"] and report["bits"] == 8 and report["calibration"]["source"] == "the run's training data"
    assert report["calibration"]["samples"] == 72  # every training sample (80 rows, 10% held out), fewer than 128
    assert report["perplexity_before"] < 50  # it learned: a random model sits near the vocabulary size (~500)
    assert abs(report["perplexity_increase"]) < 0.02 and report["top1_agreement"] >= 0.95 and report["answer_agreement"] == 1.0
    info = json.loads((learned_run / "run_info.json").read_text())
    assert info["gptq_8bit"]["perplexity_after"] == report["perplexity_after"]
    card = (out / "README.md").read_text()
    assert "gptq 8-bit" in card and "perplexity_after" in card and "gptqmodel 7.6.0" in card
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2  # the template's end of turn

    # Plain transformers in the GPTQ venv, no tuneforge: a real GPTQ checkpoint whose logits are the reported ones.
    samples = learned_run / "parity_samples.json"
    plain = subprocess.run([str(GPTQ_PYTHON), "-c", PLAIN_LOAD, str(out), str(samples)], capture_output=True, text=True,
                           timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert plain.returncode == 0, plain.stderr[-2000:]
    got = json.loads(plain.stdout.strip().splitlines()[-1])
    assert got["quant"]["quant_method"] == "gptq" and got["quant"]["bits"] == 8 and not got["tuneforge"]
    assert len(got["qweights"]) == 2 * 7 and set(got["qweights"].values()) == {"torch.int32"}  # 7 linears per layer, packed
    assert got["linear"] != "Linear"
    trained = AutoModelForCausalLM.from_pretrained(learned_run / "final", dtype=torch.float32).eval()
    ids = json.loads(samples.read_text())[:4]
    with torch.no_grad():
        diffs = [(trained(input_ids=torch.tensor([s])).logits[0] - torch.tensor(q)).abs().max().item() for s, q in zip(ids, got["logits"])]
    assert max(diffs) == pytest.approx(report["max_abs_logit_diff"], rel=1e-3, abs=1e-4)


@pytest.mark.slow
@needs_gptq_venv
def test_gptq_fails_loudly_past_the_perplexity_threshold(learned_run, tmp_path):
    proc = gptq_cli("quantize", learned_run, "--bits", "4", "--group-size", "256", "--max-ppl-increase", "0",
                    "--out", tmp_path / "q4", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("parity check failed:")]  # exit 3: the artifact, not the input
    assert len(errors) == 1 and "perplexity rose" in errors[0] and "--max-ppl-increase" in errors[0], proc.stderr[-1500:]
    report = json.loads((tmp_path / "q4" / "quantize_report.json").read_text())
    assert not report["passed"] and report["perplexity_increase"] > 0 and report["perplexity_after"] > report["perplexity_before"]


@pytest.mark.slow
@needs_gptq_venv
def test_gptq_of_a_lora_run_with_a_calibration_file_then_push_plan(learned_run, llama_dir, tmp_path):
    from tuneforge.export.push import upload_plan

    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.reverse_rows(40, seed=5))
    cfg = write_config(tmp_path / "c.yaml", learned_run / "final", data, tmp_path / "run",
                       train={"finetune": "lora", "max_steps": 10, "micro_batch_size": 8, "lr": 3e-3,
                              "generate_eval": {"samples": 3, "max_new_tokens": 8}})  # in-task held-out prompts
    assert run_cli("train", cfg).returncode == 0
    run = tmp_path / "run"
    calib = tiny.write_jsonl(tmp_path / "calib.jsonl", tiny.reverse_rows(30, seed=9))
    # A group size that does not divide the layer inputs (SmolLM2-135M: 576 vs 128) is refused before quantizing.
    assert_user_error(gptq_cli("quantize", llama_dir, "--calibration", calib, "--group-size", "128", cwd=tmp_path),
                      "--group-size 128", "input size 64", "use --group-size 64")
    # One group per row (512 wide: the MLP's down projection) is more than torch's CPU int4 kernel runs.
    assert_user_error(gptq_cli("quantize", run, "--calibration", calib, "--group-size", "-1", cwd=tmp_path),
                      "--group-size -1", "512", "--group-size 128")
    proc = gptq_cli("quantize", run, "--calibration", calib, "--samples", "12", "--bits", "8", "--group-size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    report = json.loads((run / "gptq-8bit" / "quantize_report.json").read_text())
    assert report["calibration"] == {"source": str(calib), "samples": 12, "tokens": report["calibration"]["tokens"]}
    assert report["calibration"]["tokens"] > 12 * 5 and report["passed"]
    folder, files, card = upload_plan(run, "gptq")
    names = sorted(f.name for f in files)
    assert folder == run / "gptq-8bit" and "model.safetensors" in names and "quantize_config.json" in names
    assert ".tuneforge.json" not in names and "gptq 8-bit" in card
    # A folder tuneforge did not write is never taken over, and is left as it was.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert_user_error(gptq_cli("quantize", run, "--calibration", calib, "--out", foreign, cwd=tmp_path), "not written by tuneforge")
    assert (foreign / "notes.txt").read_text() == "keep"


def test_quantize_bad_input_is_one_line(tmp_path, llama_dir):
    calib = tiny.write_jsonl(tmp_path / "calib.jsonl", tiny.reverse_rows(3))
    assert_user_error(run_cli("quantize", llama_dir, "--bits", "3", "--calibration", calib), "--bits 3", "4, 8")
    assert_user_error(run_cli("quantize", llama_dir, "--method", "awq"), "--method awq", "gptq")
    assert_user_error(run_cli("quantize", llama_dir, "--group-size", "100", "--calibration", calib), "--group-size 100", "32, 64, 128 or 256")
    assert_user_error(run_cli("quantize", llama_dir), str(llama_dir), "--calibration FILE")
    assert_user_error(run_cli("quantize", llama_dir, "--calibration", tmp_path / "nope.jsonl"), "nope.jsonl", "not found")
    assert_user_error(run_cli("quantize", tmp_path / "nothing", "--calibration", calib), "nothing")
    # This venv has no GPTQModel (on purpose): the command says how to get it, and writes nothing.
    assert_user_error(run_cli("quantize", llama_dir, "--calibration", calib, "--out", tmp_path / "q"), "GPTQModel", "tuneforge[gptq]")
    assert not (tmp_path / "q").exists()
    assert_user_error(run_cli("push", llama_dir, "--repo", "me/x", "--what", "gptq"), "no GPTQ model", "tuneforge quantize")


@pytest.mark.slow
@needs_gptq_venv
def test_gptq_of_a_qlora_run_fuses_into_the_dequantized_base(learned_run, tmp_path):
    from test_export_merge import make_run

    run = make_run(tmp_path / "run", learned_run / "final", quantize="4bit")
    (run / "config.yaml").write_text((learned_run / "config.yaml").read_text())  # the base run's data: calibration + eval split
    proc = gptq_cli("quantize", run, "--bits", "8", "--group-size", "32", "--samples", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "fused into that base de-quantized" in proc.stdout + proc.stderr
    report = json.loads((run / "gptq-8bit" / "quantize_report.json").read_text())
    assert report["passed"] and report["calibration"]["samples"] == 16 and abs(report["perplexity_increase"]) < 0.05
