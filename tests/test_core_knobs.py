"""Training knobs that must do exactly what they say: NEFTune noise, gradient checkpointing, freeze/attention errors."""

import pytest
import torch

from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.model.adapters import add_neftune, freeze, prepare_for_training


def cfg(llama_dir, **train):
    return Config.model_validate({"model": {"path": str(llama_dir)}, "data": {"train": [{"path": "x.jsonl"}]},
                                  "train": train, "lora": {"r": 4, "dropout": 0.0}} if train.get("finetune", "lora") == "lora"
                                 else {"model": {"path": str(llama_dir)}, "data": {"train": [{"path": "x.jsonl"}]}, "train": train})


def load(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)


def test_neftune_noise_only_in_train_mode_and_within_its_scale(llama_dir):
    model = load(llama_dir)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 300, (2, 10))
    clean = emb(ids).detach()
    add_neftune(model, alpha=5.0)
    model.train()
    noisy = emb(ids).detach()
    bound = 5.0 / (10 * clean.shape[-1]) ** 0.5
    assert 0 < (noisy - clean).abs().max().item() <= bound + 1e-7
    model.eval()
    assert torch.equal(emb(ids), clean)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(llama_dir, tokenizer, finetune):
    ids = torch.randint(0, 300, (2, 12))
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = prepare_for_training(load(llama_dir), cfg(llama_dir, finetune=finetune, gradient_checkpointing=gc), tokenizer, log=lambda *a: None)
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) <= 1e-6


def test_freeze_errors_are_user_errors(llama_dir):
    with pytest.raises(UserError, match="no parameter matches"):
        freeze(load(llama_dir), None, ["^nothing_like_this$"])
    with pytest.raises(UserError, match="> the model's 2 layers"):
        freeze(load(llama_dir), 3, [])
    with pytest.raises(ValueError, match="finetune: freeze needs"):
        cfg(llama_dir, finetune="freeze")
    with pytest.raises(ValueError, match="applies to finetune: freeze"):
        cfg(llama_dir, finetune="full", freeze={"layers": 1})


def test_quantize_needs_lora_and_flash_attention_needs_its_package(llama_dir):
    with pytest.raises(ValueError, match="trains through LoRA only"):
        Config.model_validate({"model": {"path": str(llama_dir), "quantize": "4bit"}, "data": {"train": [{"path": "x.jsonl"}]},
                               "train": {"finetune": "full"}})
    from tuneforge.model.load import attn_implementation

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="flash_attention_2 needs a CUDA GPU"):
            attn_implementation("flash_attention_2")
        assert attn_implementation("auto") is None  # transformers picks: sdpa where supported, else eager
    assert attn_implementation("eager") == "eager"


def test_auto_attention_loads_an_architecture_without_sdpa(tmp_path):
    """Gemma-2 has no sdpa path in transformers: attention auto must still load it (as eager)."""
    import tiny
    from tuneforge.model.load import load_model

    folder = tiny.build_model(tmp_path / "g2", "gemma2")
    model = load_model(str(folder))
    assert model.config._attn_implementation == "eager"
    llama = load_model(str(tiny.build_model(tmp_path / "l", "llama")))
    assert llama.config._attn_implementation == "sdpa"


def test_device_map_is_one_process_only(llama_dir, monkeypatch):
    base = {"model": {"path": str(llama_dir), "device_map": "auto"}, "data": {"train": [{"path": "x.jsonl"}]}}
    with pytest.raises(ValueError, match="cannot be combined with train.deepspeed"):
        Config.model_validate({**base, "train": {"deepspeed": "zero2"}})
    model_cfg = Config.model_validate(base).model
    if torch.cuda.is_available():
        from tuneforge.model.load import load_model

        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(UserError, match="ONE process"):
            load_model(str(llama_dir), model_cfg)


def test_compiled_model_saves_a_loadable_adapter(llama_dir, tokenizer, tmp_path):
    """train.compile: the final save strips torch.compile's `_orig_mod.` names (else peft saves an empty adapter)."""
    from accelerate import Accelerator
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    from tuneforge.train.core.engine import save_final

    accel = Accelerator(cpu=True, dynamo_backend="inductor")
    model = accel.prepare(get_peft_model(load(llama_dir), LoraConfig(r=4, target_modules=["q_proj"])))
    assert type(model).__name__ == "OptimizedModule"  # compiled lazily: no forward is run here
    save_final(accel, model, tokenizer, tmp_path / "final")
    adapter = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert len(adapter) == 4 and all(k.startswith("base_model.model.") for k in adapter)
    PeftModel.from_pretrained(load(llama_dir), tmp_path / "final")
