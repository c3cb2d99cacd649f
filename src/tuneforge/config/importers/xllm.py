"""X—LLM config (seed 000's config reference) -> tuneforge config."""

from __future__ import annotations

from typing import Any

from tuneforge.config.importers.axolotl import OPTIMIZERS
from tuneforge.config.importers.table import (
    Ignored, ImportResult, NotMapped, Translator, empty_or, flag, ignored, lookup, not_mapped, same_as, secret, to, when,
)

FUSE = "fusing is a separate step in tuneforge: `tuneforge merge RUN_DIR --out DIR`"
GPTQ = "GPTQ quantization is a separate step after training, not part of the training config"
HUB = "pushing to the Hub is not part of a tuneforge training config"


def _lora_targets(v: str):
    if str(v).strip() == "all":
        return {"lora.target_modules": "all-linear"}
    return {"lora.target_modules": [m.strip() for m in str(v).split(",") if m.strip()]}


def _apply_lora(v):
    return {"train.finetune": "lora" if v else "full"}


def _deepspeed_stage(v):
    if int(v) == 0:
        raise Ignored("0: no DeepSpeed")
    return {"train.deepspeed": f"zero{int(v)}"}


def _dtype(name: str):
    return flag("model.dtype", name, "false: tuneforge picks the dtype (model.dtype auto)")


def _wandb_on(v):
    if not v:
        raise Ignored("false: no W&B logging")
    raise Ignored("W&B is on when wandb_project is set (tracking.wandb.project)")


def _max_eval(v):
    return {"data.max_eval_samples": int(v)}


RULES: dict[str, Any] = {
    # general
    "experiment_key": same_as({"base"}, "custom X—LLM experiment classes have no tuneforge equivalent"),
    "save_safetensors": when(ignored("tuneforge always saves safetensors"),
                             not_mapped("tuneforge always saves safetensors (pickle checkpoints are not written)")),
    "max_shard_size": not_mapped(HUB),
    "local_rank": ignored("set by the launcher (torchrun/accelerate), not by the config"),
    "use_gradient_checkpointing": to("train.gradient_checkpointing", bool),
    "trainer_key": same_as({"lm"}, "custom X—LLM trainers have no tuneforge equivalent"),
    "force_fp32": _dtype("float32"),
    "force_fp16": _dtype("float16"),
    "from_gptq": flag("model.from_gptq", True, "false: not a GPTQ model"),
    "huggingface_hub_token": secret("HF_TOKEN"),
    "deepspeed_stage": _deepspeed_stage,
    "deepspeed_config_path": to("train.deepspeed"),
    "fsdp_strategy": empty_or(lambda v: {"train.fsdp": True}),
    "fsdp_offload": ignored("applies only with fsdp_strategy; tuneforge's FSDP preset decides offload"),
    "seed": to("train.seed"),
    "stabilize": flag("model.stabilize", True, "false: no mixed fp32 layers"),
    "path_to_env_file": ignored("tuneforge reads .env next to the config and in the working directory"),
    "prepare_dataset": ignored("tuneforge prepares (and caches) the data on first use, or with `tuneforge prepare`"),
    # fuse / quantization
    "lora_hub_model_id": not_mapped(FUSE), "lora_model_local_path": not_mapped(FUSE),
    "fused_model_local_path": not_mapped(FUSE),
    "fuse_after_training": when(not_mapped(FUSE), ignored("false: not fused")),
    "quantization_dataset_id": not_mapped(GPTQ), "quantization_max_samples": not_mapped(GPTQ),
    "quantized_model_path": not_mapped(GPTQ), "quantized_hub_model_id": not_mapped(GPTQ),
    "quantized_hub_private_repo": not_mapped(GPTQ),
    "gptq_bits": not_mapped(GPTQ), "gptq_group_size": not_mapped(GPTQ), "gptq_disable_exllama": not_mapped(GPTQ),
    # dataset
    "dataset_key": not_mapped("X—LLM dataset registry key: give the data as a file (train_local_path_to_data)"),
    "train_local_path_to_data": to("data.train", lambda v: [{"path": v}]),
    "eval_local_path_to_data": to("data.eval", lambda v: [{"path": v}]),
    "shuffle": ignored("tuneforge shuffles the training data every epoch (train.seed)"),
    "max_eval_samples": _max_eval,
    "add_eval_to_train_if_no_path": not_mapped("tuneforge never mixes eval rows back into train"),
    # tokenizer / collator
    "tokenizer_name_or_path": to("model.tokenizer"),
    "tokenizer_use_fast": ignored("tuneforge always uses the fast (Rust) tokenizer"),
    "tokenizer_padding_side": not_mapped("tuneforge pads on the right for training (packing needs no padding)"),
    "collator_key": same_as({"lm"}, "custom X—LLM collators have no tuneforge equivalent"),
    "max_length": to("data.max_length"),
    # model
    "model_name_or_path": to("model.path"),
    "push_to_hub_bos_add_bos_token": not_mapped(HUB),
    "use_flash_attention_2": flag("model.attn_implementation", "flash_attention_2", "false: sdpa attention"),
    "trust_remote_code": to("model.trust_remote_code"),
    "device_map": to("model.device_map"),
    "prepare_model_for_kbit_training": ignored("tuneforge prepares a quantized model for training itself"),
    # bitsandbytes
    "load_in_8bit": flag("model.quantize", "8bit", "false: weights are not quantized"),
    "load_in_4bit": flag("model.quantize", "4bit", "false: weights are not quantized"),
    "llm_int8_threshold": not_mapped("bitsandbytes' int8 outlier threshold is left at its default (6.0)"),
    "llm_int8_has_fp16_weight": not_mapped("bitsandbytes' int8 fp16-weight option is not exposed"),
    "bnb_4bit_use_double_quant": to("model.double_quant"),
    "bnb_4bit_quant_type": to("model.quant_type"),
    "bnb_quantize_after_model_init": not_mapped("tuneforge quantizes while loading"),
    # lora
    "apply_lora": _apply_lora,
    "lora_rank": to("lora.r"),
    "lora_alpha": to("lora.alpha"),
    "lora_dropout": to("lora.dropout"),
    "raw_lora_target_modules": _lora_targets,
    # training arguments
    "output_dir": to("output.dir"),
    "per_device_train_batch_size": to("train.micro_batch_size"),
    "do_eval": ignored("tuneforge evaluates whenever there is eval data (data.eval / data.eval_split)"),
    "per_device_eval_batch_size": to("train.eval_batch_size"),
    "gradient_accumulation_steps": to("train.grad_accum"),
    "eval_accumulation_steps": ignored("tuneforge sums eval loss on the device; nothing to accumulate"),
    "eval_delay": not_mapped("tuneforge has no eval delay"),
    "eval_steps": to("train.eval_every"),
    "warmup_steps": to("train.warmup_steps"),
    "max_steps": to("train.max_steps"),
    "num_train_epochs": to("train.epochs"),
    "learning_rate": to("train.lr", float),
    "max_grad_norm": to("train.max_grad_norm"),
    "weight_decay": to("train.weight_decay", float),
    "label_smoothing_factor": empty_or(to("train.label_smoothing")),
    "logging_steps": to("train.log_every"),
    "save_steps": to("train.save_every"),
    "save_total_limit": to("train.keep_checkpoints"),
    "optim": lookup("train.optimizer", OPTIMIZERS, "optimizer"),
    "push_to_hub": empty_or(to("output.push_to_hub")),
    "hub_model_id": to("output.hub_model_id"),
    "hub_private_repo": to("output.hub_private"),
    # wandb
    "report_to_wandb": _wandb_on,
    "wandb_api_key": secret("WANDB_API_KEY"),
    "wandb_project": to("tracking.wandb.project"),
    "wandb_entity": to("tracking.wandb.entity"),
}


def translate(cfg: dict[str, Any], source: str = "X—LLM config") -> ImportResult:
    t = Translator(source)
    report_wandb = bool(cfg.get("report_to_wandb"))
    for key, value in cfg.items():
        if key in ("wandb_project", "wandb_entity") and not report_wandb and value is not None:
            t.apply(key, value, ignored("report_to_wandb is false: no W&B logging"), "")
            continue
        t.apply(key, value, RULES.get(key), f"unknown X—LLM key {key!r}: no tuneforge equivalent")
    return t.finish({"model.path": "model_name_or_path", "model": "model_name_or_path", "data.train": "train_local_path_to_data",
                     "data": "train_local_path_to_data"})


__all__ = ["translate", "NotMapped"]
