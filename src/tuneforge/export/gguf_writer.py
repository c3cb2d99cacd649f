"""Write a transformers causal LM + its tokenizer as one GGUF file (llama.cpp / Ollama), with `gguf.GGUFWriter`.

Follows llama.cpp's convert_hf_to_gguf.py for the families we support: tensor names from gguf's own
name map, the Llama q/k row permutation (llama.cpp's non-NeoX rope), Gemma's `norm + 1`, Phi-3's fused
qkv/gate_up kept as-is, 1-D tensors kept in F32. The tokenizer is written from the fast tokenizer's
JSON: byte-level BPE as `gpt2`, sentencepiece-style BPE (byte fallback) as `llama`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from tuneforge.errors import UserError

# HF model_type -> (GGUF architecture, permute q/k rows for llama.cpp's rope, add 1 to RMSNorm weights)
ARCHS = {
    "llama": ("llama", True, False),
    "mistral": ("llama", True, False),
    "qwen2": ("qwen2", False, False),
    "qwen3": ("qwen3", False, False),
    "gemma": ("gemma", False, True),
    "gemma2": ("gemma2", False, True),
    "phi3": ("phi3", False, False),
}
# Types written by the gguf package itself; q4_k_m needs llama.cpp's quantizer (see gguf.py).
TYPES = ("f32", "f16", "bf16", "q8_0")
# tokenizer.json pre-tokenizer regexes -> llama.cpp's `tokenizer.ggml.pre` names.
PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def arch_of(config) -> tuple[str, bool, bool]:
    if config.model_type not in ARCHS:
        raise UserError(f"GGUF export: model type {config.model_type!r} is not supported (supported: {', '.join(ARCHS)})")
    return ARCHS[config.model_type]


def write_gguf(model, tokenizer, path: Path, ftype: str, name: str, extra: dict | None = None) -> None:
    import gguf

    arch, permute, norm_plus_one = arch_of(model.config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_type("model")
    write_hparams(writer, model.config, ftype)
    write_tokenizer(writer, tokenizer, model.config.vocab_size)
    for key, value in (extra or {}).items():
        writer.add_string(f"tuneforge.{key}", str(value))
    for gguf_name, data, qtype in tensors(model, arch, permute, norm_plus_one, ftype):
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type") or params.get("type") or "default"


def write_hparams(w, c, ftype: str) -> None:
    import gguf

    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope_theta(c))
    w.add_vocab_size(c.vocab_size)
    rotary = int(head_dim * getattr(c, "partial_rotary_factor", 1.0) or head_dim)
    w.add_rope_dimension_count(rotary)
    if head_dim != c.hidden_size // c.num_attention_heads or c.model_type.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if c.model_type == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    if rope_type(c) not in ("default", "llama3"):
        raise UserError(f"GGUF export: rope scaling {rope_type(c)!r} is not supported yet (supported: none, llama3)")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF stores rotary halves [x0..x_{d/2}, y0..]; llama.cpp's rope wants interleaved pairs (x0, y0, ...).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(model, arch: str, permute: bool, norm_plus_one: bool, ftype: str):
    """Yield (gguf name, numpy data, raw GGML type or None) for every weight the GGUF needs."""
    import gguf

    c = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no GGUF name for tensor {hf_name} of a {c.model_type} model")
        data = t.detach().float().cpu().numpy()
        if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = permute_qk(data, c.num_attention_heads)
        elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            data = permute_qk(data, c.num_key_value_heads)
        if norm_plus_one and name.endswith("norm.weight"):
            data = data + 1.0  # HF Gemma computes x * (1 + w); llama.cpp computes x * w
        yield (name, *encode(data, ftype))
    if arch == "llama" and rope_type(c) == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(c), None


def encode(data: np.ndarray, ftype: str):
    """-> (array to write, raw GGML type). 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them."""
    import gguf

    if data.ndim == 1 or ftype == "f32":
        return data.astype(np.float32), None
    if ftype == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if ftype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        return data.astype(np.float16), None  # Q8_0 needs rows in blocks of 32
    return gguf.quants.quantize(data, qtype), qtype


def llama3_rope_factors(c) -> np.ndarray:
    # Same numbers as llama.cpp's LlamaModel.generate_extra_tensors (Llama 3.1+ long-context rope).
    p = getattr(c, "rope_parameters", None) or c.rope_scaling
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    freqs = 1.0 / (rope_theta(c) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high, old = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0), p["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ---- tokenizer ---------------------------------------------------------------------------------------
def write_tokenizer(w, tokenizer, n_vocab: int) -> None:
    import gguf

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (supported: BPE, byte-level or sentencepiece-style)")
    spm = bool(model.get("byte_fallback"))
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    vocab = {i: tok for tok, i in model["vocab"].items()}
    vocab.update({i: t["content"] for i, t in added.items()})
    if max(vocab) >= n_vocab:
        raise UserError(f"GGUF export: the tokenizer has id {max(vocab)} but the model only {n_vocab} embedding rows")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    rank = {m.replace(" ", ""): -float(i) for i, m in enumerate(merges)}  # sentencepiece score: earlier merge wins
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        tok = vocab.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tok)
        scores.append(rank.get(tok, 0.0) if i not in added else -1000.0)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types.append(gguf.TokenType.BYTE)
        elif tok == model.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama" if spm else "gpt2")
    w.add_tokenizer_pre("default" if spm else pre_name(tj))
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if spm:
        w.add_add_space_prefix(adds_space_prefix(tj))
    write_special_tokens(w, tokenizer)


def pre_name(tj: dict) -> str:
    """llama.cpp's name for how this byte-level tokenizer splits text before BPE."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        if step.get("type") == "Split":
            regex = step.get("pattern", {}).get("Regex")
            if regex in PRE_BY_REGEX:
                return PRE_BY_REGEX[regex]
            raise UserError("GGUF export: this tokenizer's split regex is not one llama.cpp knows (llama3, qwen2, gpt-2)")
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps) and len(steps) == 1:
        return "gpt-2"
    raise UserError(f"GGUF export: pre-tokenizer {[s.get('type') for s in steps]} has no llama.cpp equivalent we know")


def adds_space_prefix(tj: dict) -> bool:
    pre, norm = json.dumps(tj.get("pre_tokenizer")), json.dumps(tj.get("normalizer"))
    return '"prepend_scheme": "first"' in pre or '"prepend_scheme": "always"' in pre or '"Prepend"' in norm


def write_special_tokens(w, tokenizer) -> None:
    from tuneforge.data.templates import stop_token_ids

    for attr, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        tid = getattr(tokenizer, f"{attr}_token_id", None)
        if tid is not None:
            add(tid)
    ids = tokenizer("a")["input_ids"]
    w.add_add_bos_token(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    stops = stop_token_ids(tokenizer)
    if len(stops) > 1 or (stops and stops[0] != tokenizer.eos_token_id):
        w.add_eot_token_id(stops[-1])  # the template's end-of-turn token: llama.cpp stops there too
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
