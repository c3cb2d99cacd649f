"""Every supported architecture trains: tiny random-init Llama, Qwen2, Mistral, Gemma, Phi-3 with LoRA."""

import pytest
import torch

import tiny
from tuneforge.config.schema import Config
from tuneforge.model.load import load_tokenizer
from tuneforge.train.run import trainer
from tuneforge.train.core.step import update


def optimizer_step(r, step: int) -> dict:
    m = r.backward_step(step)
    return {**m, **update(r.accel, r.model, r.optimizer, r.scheduler, r.cfg.train.max_grad_norm)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "phi3"])
def test_lora_step_on_each_architecture(arch, tmp_path):
    folder = tiny.build_model(tmp_path / arch, arch)
    train = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(16))
    cfg = Config.model_validate({
        "model": {"path": str(folder)},
        "data": {"train": [{"path": str(train)}], "eval_split": 0.0, "cache_dir": str(tmp_path / "cache")},
        "train": {"finetune": "lora", "max_steps": 2, "micro_batch_size": 4, "lr": 1e-2},
        "lora": {"target_modules": "all-linear"},
        "output": {"dir": str(tmp_path / "run")},
        "tracking": {"tensorboard": False, "plot": False},
    })
    r = trainer(cfg, log=lambda *a: None)
    r.setup()
    before = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    m = optimizer_step(r, 0)
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
    changed = {n for n, p in r.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    # LoRA starts with B = 0, so step 0 moves only B; A gets gradient once B is non-zero.
    assert changed == {n for n in before if "lora_B" in n}
    optimizer_step(r, 1)
    assert all(not torch.equal(p, before[n]) for n, p in r.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_local_tokenizer_keeps_its_ids_under_any_architecture(arch, tmp_path):
    from transformers import PreTrainedTokenizerFast

    folder = tiny.build_model(tmp_path / arch, arch)
    ours = load_tokenizer(str(folder))
    ref = PreTrainedTokenizerFast.from_pretrained(folder)
    text = "<|im_start|>user\nreverse the letters: a b c<|im_end|>\n"
    assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
