"""Tiny, self-contained models for tests: a BPE tokenizer trained locally and random-init configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
WORDS = "the cat dog sat on mat red blue green one two three reverse letters answer question hello world name city is a of and to in".split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return lines + ["user assistant system abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 {}[]:,\"'.!?-"]


def build_tokenizer(folder: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    # Loaded as PreTrainedTokenizerFast: AutoTokenizer may pick a model-specific class that changes ids.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def model_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    from transformers import Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig,
               "gemma2": Gemma2Config, "phi3": Phi3Config, "mixtral": MixtralConfig}
    # Gemma 2: head_dim = query_pre_attn_scalar = 256 as in the real 2B/9B: llama.cpp scales queries by 1/sqrt(head_dim),
    # transformers' GGUF reader assumes query_pre_attn_scalar 256 (it is not in the file).
    extra = {"gemma": {"head_dim": 16}, "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256}, "phi3": {"pad_token_id": 0},
             "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}}  # MoE: experts fused as 3-D parameters
    return classes[arch](**common, **extra.get(arch, {}))


def build_model(folder: Path, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2, **config_overrides) -> Path:
    """Save a random-init model + the local tokenizer into `folder` (an HF model directory).
    `config_overrides` set config attributes (e.g. tie_word_embeddings=True, as real Gemma models have)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = model_config(arch, len(tok), hidden, layers)
    cfg.eos_token_id = tok.eos_token_id
    for key, value in config_overrides.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reverse_rows(n: int, seed: int = 0) -> list[dict]:
    """'reverse the letters: c a t' -> 't a c' chat rows (varied lengths)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = [rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))]
        rows.append({"messages": [{"role": "user", "content": "reverse the letters: " + " ".join(letters)},
                                  {"role": "assistant", "content": " ".join(reversed(letters))}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
