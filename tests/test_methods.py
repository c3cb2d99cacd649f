"""Fine-tuning methods are config keys: each trains the tiny model and ONLY the intended parameters change
(asserted on the saved weights)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from tuneforge.config.schema import Config
from tuneforge.train.run import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    return tiny.write_jsonl(tmp / "t.jsonl", tiny.reverse_rows(16, seed=3)), tmp / "cache"


def train(tmp_path, llama_dir, data, model=None, lora=None, **train):
    train_file, cache = data
    cfg = {
        "model": {"path": str(llama_dir), **(model or {})},
        "data": {"train": [{"path": str(train_file)}], "eval_split": 0.0, "cache_dir": str(cache)},
        "train": {"lr": 1e-2, "max_steps": 2, "micro_batch_size": 8, "max_grad_norm": None, **train},
        "output": {"dir": str(tmp_path / "run")},
        "tracking": {"tensorboard": False, "plot": False},
    }
    if lora:
        cfg["lora"] = lora
    run(Config.model_validate(cfg), log=lambda *a: None)
    return tmp_path / "run" / "final"


def base_weights(llama_dir):
    return load_file(llama_dir / "model.safetensors")


def changed(a, b) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_full_changes_every_tensor(tmp_path, llama_dir, data):
    final = train(tmp_path, llama_dir, data, finetune="full")
    base, new = base_weights(llama_dir), load_file(final / "model.safetensors")
    assert new.keys() == base.keys() and changed(base, new) == set(base)


def test_freeze_top_layer_trains_only_that_layer(tmp_path, llama_dir, data):
    final = train(tmp_path, llama_dir, data, finetune="freeze", freeze={"layers": 1, "modules": [r"^lm_head\."]})
    base, new = base_weights(llama_dir), load_file(final / "model.safetensors")
    expected = {k for k in base if k.startswith("model.layers.1.") or k.startswith("lm_head.")}
    assert expected and changed(base, new) == expected  # layer 0, embeddings, final norm untouched


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "layers_to_transform"])
def test_lora_variants_train_only_the_adapter(tmp_path, llama_dir, data, variant):
    lora = {"r": 4, "alpha": 8, **{"rslora": {"rslora": True}, "dora": {"dora": True},
                                  "layers_to_transform": {"layers_to_transform": [1]}}.get(variant, {})}
    final = train(tmp_path, llama_dir, data, finetune="lora", lora=lora)
    adapter = load_file(final / "adapter_model.safetensors")
    conf = json.loads((final / "adapter_config.json").read_text())
    assert not (final / "model.safetensors").exists()  # the base is not re-saved
    assert all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    assert conf["use_rslora"] == (variant == "rslora") and conf["use_dora"] == (variant == "dora")
    if variant == "dora":
        assert any("lora_magnitude_vector" in k for k in adapter)
    if variant == "layers_to_transform":
        assert all(".layers.1." in k for k in adapter)


def test_added_tokens_grow_embeddings_and_save_them_with_the_adapter(tmp_path, llama_dir, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = train(tmp_path, llama_dir, data, model={"add_tokens": ["<tool>", "</tool>"]}, finetune="lora",
                  lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    tok = AutoTokenizer.from_pretrained(final)
    base = base_weights(llama_dir)
    vocab = base["model.embed_tokens.weight"].shape[0]
    assert len(tok) == vocab + 2 and tok.convert_tokens_to_ids("<tool>") == vocab
    adapter = load_file(final / "adapter_model.safetensors")
    emb = [v for k, v in adapter.items() if "embed_tokens" in k]
    head = [v for k, v in adapter.items() if "lm_head" in k]
    assert emb and head and emb[0].shape[0] == vocab + 2 and head[0].shape[0] == vocab + 2
    # Loads with plain transformers + peft (base resized to the tokenizer, as any user would).
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(model, final)
    assert model.get_input_embeddings().weight.shape[0] == vocab + 2
    from tuneforge.model.trained import load_trained  # what merge / generate / chat use

    loaded, tok2, desc = load_trained(final.parent, dtype="float32")
    assert desc["kind"] == "lora" and loaded.get_input_embeddings().weight.shape[0] == len(tok2) == vocab + 2


def test_init_from_an_adapter_continues_from_its_weights(tmp_path, llama_dir, data):
    first = train(tmp_path / "a", llama_dir, data, finetune="lora", lora={"r": 4})
    second = train(tmp_path / "b", llama_dir, data, finetune="lora", lora={"init_from": str(first)}, lr=1e-9)
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # lr ~0: the start point is the old adapter
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)


def test_resize_new_rows_are_the_mean_of_old_rows(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.model.adapters import resize_embeddings

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    tok.add_tokens(["<a>", "<b>"], special_tokens=True)
    assert resize_embeddings(model, tok)
    w = model.get_input_embeddings().weight
    assert torch.allclose(w[-2:], old.mean(0, keepdim=True).expand(2, -1)) and torch.equal(w[: len(old)], old)
    assert not resize_embeddings(model, tok)  # already the tokenizer's size


def test_pad_equal_to_eos_does_not_mask_eos_from_the_loss(tokenizer):
    from tuneforge.data.collate import collate
    from tuneforge.data.prepare import Sample
    from tuneforge.data.render import encode

    row = tiny.reverse_rows(1, seed=0)[0]
    _, enc = encode(tokenizer, row["messages"], "assistant", 256)
    eos = tokenizer.eos_token_id
    short = Sample(enc.input_ids[:-3], enc.labels[:-3])
    batch = collate([[Sample(enc.input_ids, enc.labels)], [short]], pad_id=eos, packed=False)  # pad = EOS
    assert (batch["targets"][0] == eos).any()  # the answer's EOS is still a target
    assert (batch["input_ids"][1] == eos).sum() >= 3 and not (batch["targets"][1][-3:] == eos).any()  # padding is not
