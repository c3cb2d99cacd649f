"""GGUF export: every family round-trips through transformers' GGUF reader and through llama.cpp itself within
the type's tolerance, answers like the trained model through the embedded chat template, and writes a usable Modelfile.

llama.cpp comes from llama-cpp-python, which `make test` builds (`make llama-cpp`); without it the llama.cpp
tests say so and skip, and the transformers-reader checks still run.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

import tiny
from conftest import FIXTURES
from helpers import assert_user_error, run_cli

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python not installed (`make llama-cpp`; `make test` does)")


def lora_adapter(folder: Path, base: Path) -> Path:
    """A LoRA adapter dir with random (non-zero) B matrices, so the adapter really changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(base).save_pretrained(folder)
    return folder


def parse_modelfile(path: Path) -> dict:
    text = path.read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1), "template": template.group(1) if template else None,
            "stop": re.findall(r'^PARAMETER stop "(.+)"$', text, re.M)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "phi3"])
def test_family_round_trip_f16(tmp_path, arch):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from tuneforge.export.gguf import export_loaded

    folder = tiny.build_model(tmp_path / "m", arch, **({"tie_word_embeddings": True} if arch.startswith("gemma") else {}))
    # eager attention: Gemma 2 has no sdpa path in transformers
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    r = export_loaded(model, tok, {"kind": "model"}, folder, tmp_path / "g", "f16", log=lambda *_: None)
    assert r["readback"] == "ok" and r["passed"]
    assert r["max_rel_logit_diff"] <= 5e-3 and r["top1_agreement"] > 0.95
    assert r["chat_template_embedded"] and r["prompt_ids_equal"]
    assert r["answer_agreement"] == 1.0 and all(a["trained"] for a in r["answers"])  # random weights: non-empty answers
    mf = parse_modelfile(tmp_path / "g" / "Modelfile")
    assert (tmp_path / "g" / mf["from"]).is_file() and mf["stop"] == ["<|im_end|>"]
    assert "{{ .Content }}<|im_end|>" in mf["template"] and "<|im_start|>assistant\n" in mf["template"]
    assert json.loads((tmp_path / "g" / "export_report.json").read_text())["passed"]
    lc = r["llama_cpp"]
    if LLAMA_CPP:  # llama.cpp itself: the same file, its own tokenizer and Jinja rendering of the embedded template
        assert lc["readback"] == "ok" and lc["max_rel_logit_diff"] <= 5e-3 and lc["top1_agreement"] > 0.95, lc
        assert lc["chat_template_embedded"] and lc["prompt_ids_equal"] and lc["answer_agreement"] == 1.0, lc
    else:
        assert lc["readback"].startswith("not installed")


@pytest.mark.parametrize("ftype,tol", [("f32", 1e-5), ("bf16", 3e-2), ("q8_0", 5e-2)])
def test_types_within_tolerance_and_metadata(tmp_path, llama_dir, ftype, tol):
    from gguf import GGUFReader

    from tuneforge.export.gguf import export_gguf

    r = export_gguf(str(llama_dir), str(tmp_path / "g"), ftype, log=lambda *_: None)
    assert r["passed"] and r["max_rel_logit_diff"] <= tol
    if ftype == "f32":
        assert r["max_abs_logit_diff"] < 1e-5
    reader = GGUFReader(r["path"])
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert kinds == {"f32": {"F32"}, "bf16": {"BF16"}, "q8_0": {"Q8_0"}}[ftype]
    assert "tokenizer.chat_template" in reader.fields and "tokenizer.ggml.merges" in reader.fields
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == 2  # <|im_end|>


def test_lora_adapter_is_fused_and_matches_the_adapter_model(tmp_path, llama_dir):
    from tuneforge.export.gguf import export_gguf

    adapter = lora_adapter(tmp_path / "adapter", llama_dir)
    r = export_gguf(str(adapter), str(tmp_path / "g"), "f32", log=lambda *_: None)
    assert r["passed"] and r["max_abs_logit_diff"] < 1e-4 and r["answer_agreement"] == 1.0


@needs_llama_cpp
def test_gemma1_unreadable_by_transformers_is_verified_by_llama_cpp(tmp_path):
    from tuneforge.export.gguf import export_gguf

    model = tiny.build_model(tmp_path / "m", "gemma", tie_word_embeddings=True)
    r = export_gguf(str(model), str(tmp_path / "g"), "f16", log=lambda *_: None)
    assert Path(r["path"]).is_file() and r["readback"].startswith("unavailable")
    lc = r["llama_cpp"]
    assert r["passed"] and lc["readback"] == "ok" and lc["max_rel_logit_diff"] <= 5e-3 and lc["answer_agreement"] == 1.0, lc


@needs_llama_cpp
def test_q4_k_m_through_llama_cpps_quantizer(tmp_path, learned_run):
    from gguf import GGUFReader

    from tuneforge.export.gguf import export_gguf

    r = export_gguf(str(learned_run), str(tmp_path / "g"), "q4_k_m", log=lambda *_: None)  # hidden 256: k-quant rows
    kinds = {t.tensor_type.name for t in GGUFReader(r["path"]).tensors if len(t.shape) == 2}
    assert "Q4_K" in kinds and r["path"].endswith("-q4_k_m.gguf") and not list((tmp_path / "g").glob("*.tmp"))
    for part in (r, r["llama_cpp"]):
        assert part["readback"] == "ok" and part["max_rel_logit_diff"] <= r["tolerance_rel"] and part["top1_agreement"] > 0.8, part
        assert part["answer_agreement"] >= 0.5 and part["prompt_ids_equal"], part


@pytest.mark.skipif(not (FIXTURES / "tokenizers").is_dir(), reason="shared tokenizer fixtures absent")
@pytest.mark.parametrize("name,arch", [("tinyllama-1.1b-chat-v1.0", "llama"), ("qwen2.5-instruct", "qwen2")])
def test_real_tokenizers_survive_the_round_trip(tmp_path, name, arch):
    """Sentencepiece-style (byte fallback) and byte-level vocabularies: same ids after the GGUF reader rebuilds them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.export.gguf_writer import write_gguf

    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / name)
    model = AutoModelForCausalLM.from_config(tiny.model_config(arch, len(tok), hidden=32, layers=1))
    write_gguf(model, tok, tmp_path / "x.gguf", "f16", name)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="x.gguf")
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True)
    for text in ["Hello world!  Two  spaces", " leading space\nnew line 12345 ünïcödé 日本語", chat]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.chat_template == tok.chat_template


def test_cli_export_refuses_unavailable_type_foreign_folder_and_overwrite(tmp_path, llama_dir):
    proc = run_cli("export", llama_dir, "--type", "q2_x", "--out", tmp_path / "q")
    assert_user_error(proc, "q2_x", "available: f32, f16, bf16, q8_0" + (", q4_k_m" if LLAMA_CPP else ""))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert_user_error(run_cli("export", llama_dir, "--out", foreign), "not written by tuneforge")
    ok = run_cli("export", llama_dir, "--type", "f32", "--out", tmp_path / "g")
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = {ln.split(":")[0].strip(): ln for ln in ok.stdout.splitlines() if ln.startswith("  ")}
    assert "greedy answers equal 100%" in lines["transformers"] and "prompt ids equal: True" in lines["transformers"]
    assert ("greedy answers equal 100%" if LLAMA_CPP else "not installed") in lines["llama.cpp"]
    assert_user_error(run_cli("export", llama_dir, "--type", "f32", "--out", tmp_path / "g"), "already holds a gguf", "--overwrite")


def test_corrupted_adapter_fails_with_one_line(tmp_path, llama_dir):
    adapter = lora_adapter(tmp_path / "adapter", llama_dir)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_user_error(run_cli("export", adapter, "--out", tmp_path / "g"), "adapter_model.safetensors")
    assert not (tmp_path / "g").exists()


@pytest.mark.skipif(not (FIXTURES / "tokenizers").is_dir(), reason="shared tokenizer fixtures absent")
@pytest.mark.parametrize("name", ["llama-3.2-instruct", "qwen2.5-instruct", "mistral-7b-instruct-v0.2", "phi-3-mini-4k-instruct",
                                  "tinyllama-1.1b-chat-v1.0"])
def test_modelfile_template_renders_like_the_chat_template(name):
    from transformers import AutoTokenizer

    from tuneforge.export.gguf import go_template, render_go, template_pieces, template_reproduces

    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / name)
    pieces = template_pieces(tok)
    assert template_reproduces(tok, pieces)
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert render_go(pieces, conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert "{{ .Content }}" in go_template(pieces)


DEMO_RUN = Path(__file__).resolve().parents[1] / "runs" / "demo"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_RUN / "run_info.json").is_file(), reason="no finished `make demo` run in runs/demo")
def test_demo_run_exports_and_answers_its_held_out_prompts_identically(tmp_path):
    from tuneforge.export.gguf import export_gguf

    r = export_gguf(str(DEMO_RUN), str(tmp_path / "g"), "f16", log=lambda *_: None)
    assert r["passed"] and r["readback"] == "ok" and r["prompt_ids_equal"] and r["answer_agreement"] == 1.0
    assert all(a["trained"].startswith("{") for a in r["answers"])  # the demo's JSON records, not empty replies
    if LLAMA_CPP:
        lc = r["llama_cpp"]
        assert lc["readback"] == "ok" and lc["prompt_ids_equal"] and lc["answer_agreement"] == 1.0, lc
