"""Model-layer items the seed workflows found (issue 21): MoE experts in 4 bits, a separate tokenizer,
freeze plans, device_map refusals, missing paths and pickled weights."""

import json

import pytest
import torch

import tiny
from tuneforge.config.schema import Config, ModelConfig
from tuneforge.errors import UserError
from tuneforge.model.load import load_model, load_tokenizer, resolve_model_dir
from tuneforge.model.plan import PlanInput, plan, shape_from_config


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return tiny.build_model(tmp_path_factory.mktemp("mixtral"), "mixtral")


def qlora_config(path, **lora) -> Config:
    return Config.model_validate({"model": {"path": str(path), "quantize": "4bit"}, "data": {"train": [{"path": "x.jsonl"}]},
                                  "lora": {"r": 4, **lora}})


# ---- MoE experts in 4 bits -----------------------------------------------------------------------------
def test_moe_experts_are_stored_in_4_bits_and_compute_on_them(mixtral_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from tuneforge.model.moe import Experts4bit

    model = load_model(str(mixtral_dir), qlora_config(mixtral_dir).model)
    model.train()  # never eval a CPU 4-bit model before training (STACK-NOTES: the repack trap)
    full = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, Experts4bit)
        stored = list(experts.parameters())
        assert stored and all(type(p).__name__ == "Params4bit" and p.dtype == torch.uint8 for p in stored)
        fp32 = sum(getattr(full.model.layers[i].mlp.experts, n).numel() * 4 for n in ("gate_up_proj", "down_proj"))
        assert sum(p.numel() for p in stored) == fp32 / 8  # two 4-bit values per byte
        consts = sum(p.quant_state.absmax.numel() * p.quant_state.absmax.element_size() for p in stored)
        assert 0 < consts < fp32 / 8 / 8  # one 8-bit (double-quant) absmax per 64-value block, + a few per expert
    # The 4-bit model computes exactly what a full-precision model holding the de-quantized weights computes.
    from peft.utils.integrations import dequantize_module_weight

    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            full.get_submodule(name).weight.data = dequantize_module_weight(module).float()
        if isinstance(module, Experts4bit):
            for p in ("gate_up_proj", "down_proj"):
                getattr(full.get_submodule(name), p).data = module.dequantized(p)
    full.train()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Equal up to float summation order (the 4-bit path de-quantizes then runs its own matmul; thread counts vary).
        torch.testing.assert_close(model(input_ids=ids).logits, full(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_moe_qlora_step_has_lora_gradients_and_frozen_experts(mixtral_dir, tokenizer):
    pytest.importorskip("bitsandbytes")
    from tuneforge.model.adapters import prepare_for_training

    cfg = qlora_config(mixtral_dir, target_modules="all-linear")
    with pytest.raises(UserError, match="all-linear on a 4-bit MoE would adapt its experts"):
        prepare_for_training(load_model(str(mixtral_dir), cfg.model), cfg, tokenizer, log=lambda *_: None)
    cfg = qlora_config(mixtral_dir, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = prepare_for_training(load_model(str(mixtral_dir), cfg.model), cfg, tokenizer, log=lambda *_: None)
    model.train()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and not any("experts" in n for n in lora)  # experts: no LoRA target
    opt = torch.optim.AdamW(lora.values(), lr=1e-2)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.abs().sum().item() for n, p in lora.items() if "lora_B" in n}
        assert min(grads.values()) > 0, grads
        losses.append(out.loss.item())
        opt.step()
    assert losses[1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "experts" in n)


def test_moe_8bit_is_refused_not_left_in_full_precision(mixtral_dir):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(UserError, match="8bit leaves this MoE's fused experts"):
        load_model(str(mixtral_dir), ModelConfig(path=str(mixtral_dir), quantize="8bit"))


def test_plan_mixtral_8x7b_qlora_within_15_percent_of_the_seed_table(tmp_path):
    """Seed 004's VRAM table: QLoRA 4-bit 8x7B = 32 GB. The plan of the seed's own command (imported), with
    LLaMA-Factory's defaults for what it does not say (cutoff_len 1024, lora_rank 8, gradient checkpointing on)."""
    from pathlib import Path

    from transformers import MixtralConfig

    from tuneforge.config.importers import import_file
    from tuneforge.config.load import validate
    from tuneforge.model.plan import inputs_from_config

    seed = Path(__file__).parent / "data" / "seeds_004_sft_mixtral.sh"
    raw = import_file(seed, "llamafactory").config
    raw["model"]["path"] = str(tmp_path)
    raw["train"]["gradient_checkpointing"] = True
    raw["lora"]["r"] = 8
    cfg = validate(raw)
    assert (cfg.model.quantize, cfg.train.micro_batch_size, cfg.lora.target_modules, cfg.data.max_length) == ("4bit", 2, ["q_proj", "v_proj"], 1024)
    mixtral_8x7b = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)
    shape = shape_from_config(mixtral_8x7b)
    assert shape.params == pytest.approx(46.7e9, rel=0.01) and shape.linear_params / shape.params > 0.99
    p = plan(shape, inputs_from_config(cfg, assume_gpu=True))
    assert p.parts["weights"] / 1e9 == pytest.approx(shape.linear_params * 4.127 / 8 / 1e9, rel=0.05)  # was 85 GiB
    assert 32 * 0.85 <= p.peak / 1e9 <= 32 * 1.15, p.parts


# ---- plan: train.freeze --------------------------------------------------------------------------------
def test_plan_counts_what_a_freeze_run_trains():
    from transformers import LlamaConfig

    # H=64, I=128, 2 layers, 4 heads x 16, 2 kv heads, vocab 512, untied head (as tests/test_plan.py's llama_a).
    s = shape_from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False))
    layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128
    top1 = plan(s, PlanInput(finetune="freeze", weight_dtype="float32", freeze_layers=1))
    assert top1.trainable == layer
    assert top1.parts["gradients"] == layer * 4 and top1.parts["optimizer"] == 2 * layer * 4
    assert top1.parts["weights"] == 139584 * 4
    head = plan(s, PlanInput(finetune="freeze", weight_dtype="float32", freeze_layers=1, freeze_modules=["lm_head"]))
    assert head.trainable == layer + 512 * 64
    cfg = Config.model_validate({"model": {"path": "m"}, "data": {"train": [{"path": "x.jsonl"}]},
                                 "train": {"finetune": "freeze", "freeze": {"layers": 1, "modules": ["lm_head"]}}})
    from tuneforge.model.plan import inputs_from_config

    assert plan(s, inputs_from_config(cfg)).trainable == layer + 512 * 64


def test_plan_freeze_count_equals_the_trained_parameters(llama_dir):
    """The planner's rule and the trainer's (model/adapters.freeze) pick the same parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.model.adapters import freeze

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    trained = freeze(model, 1, ["embed_tokens"])
    s = shape_from_config(AutoConfig.from_pretrained(llama_dir))
    assert plan(s, PlanInput(finetune="freeze", freeze_layers=1, freeze_modules=["embed_tokens"])).trainable == \
        sum(dict(model.named_parameters())[n].numel() for n in trained)


# ---- a tokenizer of its own ----------------------------------------------------------------------------
def test_model_tokenizer_is_used_instead_of_the_models(tmp_path, llama_dir):
    import shutil

    weights_only = tmp_path / "weights"
    shutil.copytree(llama_dir, weights_only)
    for f in weights_only.glob("*"):
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    tok_dir = tmp_path / "tok"
    own = tiny.build_tokenizer(tok_dir, vocab_size=400)
    cfg = ModelConfig(path=str(weights_only), tokenizer=str(tok_dir))
    tok = load_tokenizer(resolve_model_dir(cfg, need_weights=False), cfg)
    assert tok.get_vocab() == own.get_vocab() and len(tok) != len(load_tokenizer(str(llama_dir)))
    with pytest.raises(UserError, match="model.path: .* has no tokenizer vocabulary"):
        load_tokenizer(str(weights_only), ModelConfig(path=str(weights_only)))
    with pytest.raises(UserError, match=r"model.tokenizer: \./nope does not exist"):
        load_tokenizer(str(weights_only), ModelConfig(path=str(weights_only), tokenizer="./nope"))


# ---- refusals ------------------------------------------------------------------------------------------
def test_missing_relative_model_path_says_it_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("./models/tiny", "models/tiny/v2"):
        with pytest.raises(UserError, match="does not exist") as err:
            resolve_model_dir(ModelConfig(path=path))
        assert str(tmp_path / "models") in str(err.value) and "config.json" not in str(err.value)


def test_device_map_auto_is_refused_without_two_gpus(llama_dir):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2+ GPUs: device_map auto splits the model there")
    with pytest.raises(UserError, match="model.device_map: auto splits one model over several GPUs, but this machine shows"):
        load_model(str(llama_dir), ModelConfig(path=str(llama_dir), device_map="auto"))


class Marker:
    def __reduce__(self):
        return (print, ("this ran",))  # what a malicious pickle would run instead


def test_pickled_weights_that_hold_code_are_refused_in_one_line(tmp_path, llama_dir, capsys):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(llama_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Marker()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin\): pickled weights that hold more than tensors") as err:
        load_model(str(folder))
    assert "\n" not in str(err.value) and "this ran" not in capsys.readouterr().out


@pytest.mark.slow
def test_run_with_a_separate_tokenizer_keeps_it_for_generate(tmp_path, llama_dir):
    """model.tokenizer: the weights' folder has no tokenizer at all; the run trains with the named one, records it,
    and its final folder holds that tokenizer, which `generate` then uses."""
    import shutil

    from helpers import run_cli, run_cli_inprocess, write_config

    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(llama_dir / name, weights / name)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, tok_dir / f.name)
    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.reverse_rows(16))
    cfg = write_config(tmp_path / "c.yaml", weights, data, tmp_path / "run", train={"max_steps": 2})
    cfg.write_text(cfg.read_text().replace("model:\n", f"model:\n  tokenizer: {tok_dir}\n", 1))
    missing = run_cli_inprocess("config", "validate", cfg, "--set", "model.tokenizer=./no-such-tokenizer")
    assert missing.returncode == 2 and "model.tokenizer: ./no-such-tokenizer does not exist" in missing.stderr
    proc = run_cli("train", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["base_model"]["tokenizer"] == str(tok_dir)
    final = tmp_path / "run" / "final"
    assert json.loads((final / "tokenizer.json").read_text())["model"] == json.loads((tok_dir / "tokenizer.json").read_text())["model"]
    answer = run_cli_inprocess("generate", tmp_path / "run", "--prompt", "reverse the letters: a b", "--max-new-tokens", "3")
    assert answer.returncode == 0, answer.stderr[-2000:]


def test_train_refuses_device_map_auto_before_anything_runs(tmp_path, llama_dir):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2+ GPUs: device_map auto splits the model there")
    from helpers import assert_user_error, run_cli_inprocess, write_config

    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.reverse_rows(8))
    cfg = write_config(tmp_path / "c.yaml", llama_dir, data, tmp_path / "run")
    proc = run_cli_inprocess("train", cfg, "--set", "model.device_map=auto")  # seed 002's split_model
    assert_user_error(proc, "model.device_map", "remove model.device_map")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # no data prepared, no run started
