"""QLoRA = LoRA + model.quantize, on what bitsandbytes runs on CPU. The CPU trap (STACK-NOTES): an eval-mode
forward repacks 4-bit weights and LoRA training is wrong afterwards; the core's eval keeps those layers in
train mode, so a run with evals in between trains exactly like one without."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from tuneforge.config.schema import Config
from tuneforge.train.run import run

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow


def qlora(tmp_path, llama_dir, name, quantize="4bit", **train):
    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(40, seed=5))
    cfg = Config.model_validate({
        "model": {"path": str(llama_dir), "quantize": quantize},
        "data": {"train": [{"path": str(train_file)}], "eval_size": 8, "cache_dir": str(tmp_path / "cache")},
        "train": {"finetune": "lora", "lr": 1e-2, "max_steps": 3, "micro_batch_size": 8, "seed": 1, **train},
        "lora": {"r": 4},
        "output": {"dir": str(tmp_path / name)},
        "tracking": {"tensorboard": False, "plot": False},
    })
    run(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(tmp_path / name / "final" / "adapter_model.safetensors"), [r["loss"] for r in rows if "loss" in r], rows


def test_qlora_4bit_trains_and_evals_do_not_disturb_training(tmp_path, llama_dir):
    plain, losses, _ = qlora(tmp_path, llama_dir, "plain")
    evald, losses_e, rows = qlora(tmp_path, llama_dir, "with_eval", eval_every=1)
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2, 3]
    assert all(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)  # every LoRA B got gradient
    assert losses_e == pytest.approx(losses, abs=1e-6)
    assert max((plain[k] - evald[k]).abs().max().item() for k in plain) <= 1e-6
    info = json.loads((tmp_path / "plain" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["base_model"]["quantize"] == "4bit"


def test_eval_mode_keeps_cpu_4bit_layers_in_train_mode(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneforge.train.core.step import eval_mode, is_cpu_4bit

    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model.train()
    with eval_mode(model):
        assert not model.training and all(m.training for m in model.modules() if is_cpu_4bit(m))
        assert sum(is_cpu_4bit(m) for m in model.modules()) == 14  # 2 layers x 7 projections
    assert model.training


def test_qlora_8bit_trains(tmp_path, llama_dir):
    adapter, losses, _ = qlora(tmp_path, llama_dir, "int8", quantize="8bit", max_steps=2)
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k) and all(map(torch.isfinite, map(torch.tensor, losses)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes GPU kernels, paged optimizer)")
def test_qlora_on_gpu_with_paged_adamw_and_checkpointing(tmp_path, llama_dir):
    adapter, losses, rows = qlora(tmp_path, llama_dir, "gpu", optimizer="paged_adamw_8bit", gradient_checkpointing=True,
                                  mixed_precision="bf16", eval_every=1)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r) and len(losses) == 3
