"""Fine-tuning methods as config, not code paths: which parameters train.

    full    every parameter trains
    freeze  only the top `train.freeze.layers` decoder layers and/or parameters matching `train.freeze.modules`
    lora    a peft LoRA adapter (rsLoRA, DoRA, modules_to_save, layers_to_transform, init from an adapter dir);
            on a `model.quantize`d base this is QLoRA (k-bit preparation done once, here)

New tokens (`model.add_tokens`) grow the embeddings (new rows = mean of the old rows); the embedding and
output layers then train and are saved, with every method.
"""

from __future__ import annotations

import re

from tuneforge.config.schema import LoraConfig
from tuneforge.errors import UserError


def prepare_for_training(model, cfg, tokenizer, log=print):
    """The loaded base model -> the model to train (the trainable set decided by train.finetune)."""
    resized = resize_embeddings(model, tokenizer)
    if resized:
        log(f"embeddings resized to {len(tokenizer)} tokens (new rows = mean of the old rows); they train and are saved")
    t = cfg.train
    if cfg.model.quantize:
        from peft import prepare_model_for_kbit_training

        # Once, before LoRA: casts norms/head to fp32 and enables input grads (+ checkpointing when asked).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if t.finetune == "lora":
        model = add_lora(model, cfg.lora, embedding_modules(model) if resized else [])
    elif t.finetune == "freeze":
        freeze(model, t.freeze.layers, t.freeze.modules, train_embeddings=resized)
    if t.neftune_alpha:
        add_neftune(model, t.neftune_alpha)
    # ZeRO-3 loads parameters already partitioned (numel() == 0 here): DeepSpeed keeps the full size in ds_numel.
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log(f"finetune: {t.finetune} - {n_train:,} of {n_all:,} parameters train ({n_train / max(n_all, 1):.2%})")
    return model


# ---- LoRA ------------------------------------------------------------------------------------------
def add_lora(model, cfg: LoraConfig, extra_modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if cfg.init_from:
        from pathlib import Path

        if not (Path(cfg.init_from) / "adapter_config.json").is_file():
            raise UserError(f"lora.init_from: {cfg.init_from} is not a LoRA adapter directory (no adapter_config.json)")
        # The adapter's own config (r, targets, ...) applies; it keeps training from its weights.
        return PeftModel.from_pretrained(model, cfg.init_from, is_trainable=True)
    modules_to_save = list(dict.fromkeys([*cfg.modules_to_save, *(extra_modules_to_save or [])])) or None
    targets = cfg.target_modules
    if targets == "all-linear" and any(type(m).__name__ == "Experts4bit" for m in model.modules()):
        # peft's all-linear adapts an MoE's fused experts; kept in 4 bits (model/moe.py) they take no adapter.
        raise UserError("lora.target_modules: all-linear on a 4-bit MoE would adapt its experts, which stay 4-bit without "
                        "an adapter here; name the layers instead, e.g. [q_proj, k_proj, v_proj, o_proj]")
    if targets == "all-linear" and cfg.layers_to_transform is not None:
        targets = linear_module_names(model)  # peft takes layers_to_transform with a list of names only
    try:
        peft_cfg = PeftLoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            use_rslora=cfg.rslora, use_dora=cfg.dora, modules_to_save=modules_to_save,
            layers_to_transform=cfg.layers_to_transform, task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:  # e.g. a target module name that is not in this model
        raise UserError(f"lora: {str(exc).splitlines()[0]} (check lora.target_modules / layers_to_transform)") from None


def linear_module_names(model) -> list[str]:
    """Leaf names of every Linear layer except the output head: what peft's 'all-linear' means."""
    import torch

    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head})


# ---- freeze ----------------------------------------------------------------------------------------
def decoder_layers(model):
    """The ModuleList of transformer blocks (the one whose length is config.num_hidden_layers)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise UserError("train.freeze.layers: cannot find this model's decoder layers; use train.freeze.modules (name regexes)")


def freeze(model, top_layers: int | None, patterns: list[str], train_embeddings: bool = False) -> list[str]:
    """Freeze everything, then unfreeze the top N layers and the parameters matching any regex. -> trained names."""
    for p in model.parameters():
        p.requires_grad_(False)
    prefixes = []
    if top_layers:
        name, layers = decoder_layers(model)
        if top_layers > len(layers):
            raise UserError(f"train.freeze.layers: {top_layers} > the model's {len(layers)} layers")
        prefixes = [f"{name}.{i}." for i in range(len(layers) - top_layers, len(layers))]
    regexes = [re.compile(p) for p in patterns]
    emb = embedding_modules(model) if train_embeddings else []
    trained = []
    for pname, p in model.named_parameters():
        if pname.startswith(tuple(prefixes)) or any(r.search(pname) for r in regexes) or pname.rsplit(".", 1)[0] in emb:
            p.requires_grad_(True)
            trained.append(pname)
    if not trained:
        raise UserError(f"train.freeze: no parameter matches modules {patterns} (parameter names look like "
                        f"{next(iter(dict(model.named_parameters())))!r})")
    return trained


# ---- tokens and embeddings -------------------------------------------------------------------------
def embedding_modules(model) -> list[str]:
    """Names of the input embedding and (untied) output layer modules."""
    names = {id(m): n for n, m in model.named_modules()}
    out = [names[id(model.get_input_embeddings())]]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        out.append(names[id(head)])
    return out


def resize_embeddings(model, tokenizer) -> bool:
    """Grow the embeddings to the tokenizer's size when tokens were added; new rows = mean of the old rows
    (a new token starts as an 'average' token instead of noise that dominates the first steps)."""
    import torch

    old = model.get_input_embeddings().num_embeddings  # not weight.shape: a ZeRO-3 partitioned weight is empty
    if len(tokenizer) <= old:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None and layer.weight.shape[0] > old:
                layer.weight[old:] = layer.weight[:old].mean(0, keepdim=True)
    return True


# ---- NEFTune ---------------------------------------------------------------------------------------
def add_neftune(model, alpha: float):
    """NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training, scaled by
    alpha / sqrt(sequence length x hidden size). A forward hook: off in eval mode and generation."""
    import torch

    def hook(module, inputs, output):
        if not module.training:
            return output
        scale = alpha / (output.shape[-2] * output.shape[-1]) ** 0.5  # (B, T, H): T x H per row
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(hook)
