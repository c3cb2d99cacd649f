"""Load what `train` wrote: a run dir (adapter or full), a bare adapter dir, or a merged/plain model dir."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError
from tuneforge.rundir import RunDir, read_run_info


def describe(path: str | Path) -> dict:
    """-> {"kind": "lora"|"full"|"model", "weights": dir with weights, "base": base source or None}."""
    p = Path(path)
    if RunDir(p).exists():
        info = read_run_info(p)
        if info.get("status") != "finished":
            raise UserError(f"{p}: the run has not finished (status {info.get('status')}); finish it with `tuneforge train CONFIG --resume`")
        return {"kind": info["finetune"], "weights": RunDir(p).final, "base": _base_source(info)}
    if (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return {"kind": "lora", "weights": p, "base": base}
    if (p / "config.json").is_file():
        return {"kind": "model", "weights": p, "base": None}
    raise UserError(f"{p}: not a run directory, adapter or model directory (no run_info.json, adapter_config.json or config.json)")


def _base_source(info: dict) -> str:
    # The resolved dir (e.g. a converted GGUF) may be gone on another machine: fall back to re-resolving.
    from tuneforge.model.load import resolve_model_dir

    cached = info.get("base_model_dir")
    if cached and (Path(cached) / "config.json").is_file():
        return cached
    return resolve_model_dir(ModelConfig(**info["base_model"]))


def load_trained(path: str | Path, dtype: str = "auto"):
    """-> (model ready for inference, tokenizer with the training chat template, description)."""
    from tuneforge.model.load import load_model, load_tokenizer

    d = describe(path)
    tokenizer = load_tokenizer(str(d["weights"]))
    if d["kind"] == "lora":
        from peft import PeftModel

        from tuneforge.model.load import weights_error

        base = load_model(d["base"], dtype=dtype)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer))  # tokens added in training (model.add_tokens): the adapter holds their rows
        try:
            model = PeftModel.from_pretrained(base, str(d["weights"]))
        except Exception as exc:  # noqa: BLE001 - a corrupt adapter file is a user error; anything else re-raises
            raise weights_error(d["weights"], exc) from None
    else:
        model = load_model(str(d["weights"]), dtype=dtype)
    model.eval()
    return to_best_device(model), tokenizer, d


def to_best_device(model):
    """Inference runs on the GPU when there is one (a model already placed by a device map stays put)."""
    import torch

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu" and not getattr(model, "hf_device_map", None):
        return model.to("cuda")
    return model
