"""Fine-tuning methods as config: which parameters train (full, LoRA via peft)."""

from __future__ import annotations

from tuneforge.config.schema import LoraConfig


def add_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def prepare_for_training(model, cfg, tokenizer, log=print):
    """The loaded base model -> the model to train: gradient checkpointing, then the method's trainable set."""
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if cfg.train.finetune == "lora":
        model = add_lora(model, cfg.lora)
    return model
