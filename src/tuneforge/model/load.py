"""Load base models and tokenizers from a local HF directory, a .gguf file, or a hub id."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError


def tuneforge_home() -> Path:
    return Path(os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge"))


def looks_local(path: str) -> bool:
    """A file system path rather than a hub id (org/name: one slash)."""
    return path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") > 1 or Path(path).exists()


def resolve_model_dir(cfg: ModelConfig, log=print, need_weights: bool = True) -> str:
    """Return something `from_pretrained` accepts: a local dir (GGUF converted once, cached) or a hub id.
    With need_weights=False (prepare, inspect) a directory holding only tokenizer files is enough."""
    path = os.path.expanduser(cfg.path)
    if not looks_local(path):
        return path  # hub id: downloaded by transformers (needs network; HF_TOKEN from env/.env)
    p = Path(path)
    if not p.exists():
        raise UserError(f"model.path: {cfg.path} does not exist (resolved to {p.absolute()}; relative paths start at "
                        "the working directory)")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.path: GGUF file not found: {path}")
        return str(gguf_to_hf_dir(p, log))
    if not need_weights and any((p / f).is_file() for f in VOCAB_FILES + ("tokenizer_config.json",)):
        return str(p)  # a folder without a vocabulary is refused, with its own message, by load_tokenizer
    if not (p / "config.json").is_file():
        raise UserError(f"model.path: {path} is not a model directory (no config.json); give an HF model dir, a .gguf file or a hub id")
    return str(p)


def gguf_to_hf_dir(gguf_path: Path, log=print) -> Path:
    """Dequantize a GGUF file to an HF safetensors dir once; later loads take ~1 s instead of ~20 s."""
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()[:16]
    out = tuneforge_home() / "gguf" / digest
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_path.name} to a cached HF model dir (once): {out}")
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers' GGUF tokenizer conversion drops the chat template: read it from the metadata.
    tok.chat_template = tok.chat_template or gguf_chat_template(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # A GGUF-loaded model is flagged "quantized" and refuses save_pretrained; its weights are already
    # dequantized fp32, so copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Files that hold a vocabulary. transformers builds a near-empty tokenizer from a lone tokenizer_config.json.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")


def load_tokenizer(source: str, cfg: ModelConfig | None = None):
    """The tokenizer of `source` (the resolved model), or of `model.tokenizer` when the config names one."""
    from transformers import AutoTokenizer

    from tuneforge.data.templates import apply_template_override

    place, revision = "model.path", cfg.revision if cfg else None
    if cfg and cfg.tokenizer:
        place, source, revision = "model.tokenizer", os.path.expanduser(cfg.tokenizer), None  # revision names the model's
        if looks_local(source) and not Path(source).exists():
            raise UserError(f"model.tokenizer: {cfg.tokenizer} does not exist (resolved to {Path(source).absolute()}; "
                            "relative paths start at the working directory)")
    folder = Path(os.path.expanduser(source))
    present = [f for f in VOCAB_FILES if (folder / f).is_file()] if folder.is_dir() else None
    if present == []:
        raise UserError(f"{place}: {source} has no tokenizer vocabulary (missing tokenizer.json or tokenizer.model)")
    try:
        if present == ["tokenizer.model"] and not (folder / "tokenizer_config.json").is_file():
            tok = sentencepiece_tokenizer(folder, place)
        else:
            tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=bool(cfg and cfg.trust_remote_code))
    except (OSError, ValueError) as exc:
        raise UserError(f"{place}: cannot load a tokenizer from {source}: {str(exc).splitlines()[0]}") from None
    apply_template_override(tok, cfg.chat_template if cfg else None)
    if cfg and cfg.add_tokens:
        # Special: never split or merged by the tokenizer. Training grows the embeddings to match.
        tok.add_tokens(list(cfg.add_tokens), special_tokens=True)
    if tok.pad_token is None and cfg and cfg.pad_token and cfg.pad_token not in tok.get_vocab():
        tok.add_tokens([cfg.pad_token], special_tokens=True)
    if tok.pad_token is None:
        # Padding only matters for padded batches and batched generation; EOS is the safe default.
        tok.pad_token = (cfg.pad_token if cfg and cfg.pad_token else None) or tok.eos_token
    return tok


def sentencepiece_tokenizer(folder: Path, place: str = "model.path"):
    """A folder holding only a sentencepiece tokenizer.model (Mistral's own layout): a Llama-style BPE
    tokenizer built from it, checked against sentencepiece's own encoding before it is used."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError(f"{place}: {folder} holds only a sentencepiece tokenizer.model: pip install 'tuneforge[sentencepiece]' (or add tokenizer.json)") from None
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    specials = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())) if i >= 0}
    tok = LlamaTokenizer.from_pretrained(str(folder), **specials)
    probe = "Hello world, this is a test.\nx = 1"
    if tok(probe, add_special_tokens=False)["input_ids"] != sp.encode(probe):
        raise UserError(f"{place}: {folder}: its tokenizer.model is not a Llama-style BPE model tuneforge can rebuild (add tokenizer.json)")
    return tok


def pick_dtype(name: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(source: str, cfg: ModelConfig | None = None, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    kwargs = {
        "dtype": pick_dtype(cfg.dtype if cfg else dtype),
        "trust_remote_code": bool(cfg and cfg.trust_remote_code),
    }
    attn = attn_implementation(cfg.attn_implementation if cfg else "auto")
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if cfg and cfg.revision:
        kwargs["revision"] = cfg.revision
    moe = bool(cfg and cfg.quantize) and has_fused_experts(source, cfg)
    if moe and cfg.quantize == "8bit":
        raise UserError("model.quantize: 8bit leaves this MoE's fused experts (most of its weights) at full precision; "
                        "use quantize: 4bit, which stores them in 4 bits too")
    staged = moe and torch_cuda() is not None and not cfg.device_map
    if cfg and cfg.quantize:
        kwargs["quantization_config"] = bnb_config(cfg)
        if torch_cuda() is not None:
            # bitsandbytes quantizes while placing on the GPU. An MoE loads in CPU RAM first, so that its
            # experts reach the GPU already in 4 bits (Experts4bit quantizes them there one at a time).
            kwargs["device_map"] = {"": "cpu" if staged else torch_cuda()}
    if cfg and cfg.device_map:
        check_device_map()
        kwargs["device_map"] = "auto"  # accelerate dispatches layers over the GPUs; outputs return to the input device
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model from {source}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise weights_error(source, exc) from None
    if moe:
        from tuneforge.model.moe import quantize_fused_experts

        quantize_fused_experts(model, cfg.quant_type, cfg.double_quant, kwargs["quantization_config"].bnb_4bit_compute_dtype,
                               device=f"cuda:{torch_cuda()}" if staged else None)
        if staged:
            model.to(f"cuda:{torch_cuda()}")
            model.hf_device_map = {"": torch_cuda()}  # accelerate refuses a 4-bit model mapped to another device
    return model


def has_fused_experts(source: str, cfg: ModelConfig) -> bool:
    """Whether the model keeps MoE experts as fused 3-D parameters (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.model.moe import fused_experts

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        with torch.device("meta"):
            return bool(fused_experts(AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model from {source}: {str(exc).splitlines()[0]}") from None


def check_device_map() -> None:
    """model.device_map: auto needs two or more GPUs in one process; anything else is refused, not ignored."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("model.device_map: auto splits one model over the GPUs of ONE process; run without --nproc "
                        "(or use train.deepspeed / train.fsdp to shard across processes)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        raise UserError(f"model.device_map: auto splits one model over several GPUs, but this machine shows {gpus}; "
                        "remove model.device_map (one GPU or CPU holds the whole model)")


def attn_implementation(name: str) -> str | None:
    """auto = flash_attention_2 when flash-attn is installed and a GPU is present, else transformers' own
    default for the architecture (None): sdpa where the model supports it, eager where it does not (Gemma-2)."""
    import importlib.util

    has_flash = importlib.util.find_spec("flash_attn") is not None and torch_cuda() is not None
    if name == "flash_attention_2" and not has_flash:
        raise UserError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
                        "(pip install flash-attn), or use sdpa")
    if name == "auto":
        return "flash_attention_2" if has_flash else None
    return name


def torch_cuda():
    """The local CUDA device index of this process, or None on CPU."""
    import os

    import torch

    return int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else None


def bnb_config(cfg: ModelConfig):
    """bitsandbytes quantization for `model.quantize` (4bit: nf4/fp4, double quant, compute dtype)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantize: {cfg.quantize} needs bitsandbytes: pip install 'tuneforge[quant]'")
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=pick_dtype(cfg.compute_dtype))


def weights_error(folder: str | Path, exc: Exception) -> Exception:
    """A corrupt .safetensors file -> a UserError naming it (safetensors' own error names no file); a pickle
    that torch's weights_only loader refuses (it holds more than tensors) -> a UserError; any other exception
    is returned unchanged (a bug: re-raised with its traceback)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        found = sorted(f.name for f in Path(folder).iterdir() if f.suffix in PICKLE_SUFFIXES) if Path(folder).is_dir() else []
        where = f"{folder} ({', '.join(found)})" if found else str(folder)
        return UserError(f"{where}: pickled weights that hold more than tensors; tuneforge never runs code from a weights "
                         "file (give the weights as .safetensors)")
    if type(exc).__name__ != "SafetensorError":
        return exc
    from safetensors import safe_open

    bad = Path(folder)
    for f in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open the header is what we are looking for
            bad = f
            break
    return UserError(f"{bad}: truncated or not a safetensors file ({str(exc).splitlines()[0]}) (re-save or re-download the weights)")
