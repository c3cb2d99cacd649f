"""axolotl config (and the serverless worker's `args`, seed 001) -> tuneforge config."""

from __future__ import annotations

from typing import Any

from tuneforge.config.importers.table import (
    BUILTIN_TEMPLATES, NOTE, Default, Ignored, ImportResult, NotMapped, Translator, empty_or, flag, flash_on, ignored, lookup,
    not_mapped, optimizer, positive, same_as, secret, to,
)

ARCH = "tuneforge reads the architecture from the model's config.json"
HF_CLASSES = "tuneforge always loads AutoModelForCausalLM / AutoTokenizer"

# axolotl dataset `type` -> tuneforge data.train[].format
DATASET_TYPES = {
    "alpaca": "alpaca", "alpaca_chat": "alpaca", "alpaca:chatml": "alpaca", "alpaca_w_system": "alpaca",
    "sharegpt": "sharegpt", "sharegpt:chat": "sharegpt", "chat_template": "messages", "messages": "messages",
    "completion": "text", "input_output": "input_output", "oasst": "oasst",
}
# tokenizer_type: the classes AutoTokenizer already resolves to (fast, or the slow name whose fast twin it loads).
TOKENIZER_FAMILIES = ("Llama", "CodeLlama", "GPT2", "GPTNeoX", "Qwen2", "Gemma", "Bloom", "T5", "Mistral")
TOKENIZER_CLASSES = {"AutoTokenizer", "PreTrainedTokenizerFast"} | {
    f"{family}Tokenizer{fast}" for family in TOKENIZER_FAMILIES for fast in ("", "Fast")}


def _tokenizer_type(v):
    if v not in TOKENIZER_CLASSES:
        raise NotMapped(f"tokenizer class {v!r}: tuneforge loads tokenizers with AutoTokenizer (fast) and knows it "
                        f"matches only {', '.join(sorted(TOKENIZER_CLASSES))}; remove tokenizer_type or point "
                        "tokenizer_config at a tokenizer folder that names its class")
    raise Ignored(f"AutoTokenizer loads the fast version of {v} from the tokenizer's own tokenizer_config.json")


def _wandb_watch(v):
    if v in (False, "false", "", "none", "None"):
        raise Ignored("off: nothing to watch")
    raise NotMapped(f"wandb_watch {v!r}: tuneforge logs loss, lr, grad norm and throughput to W&B but not per-layer "
                    "gradient/parameter histograms (wandb.watch); remove wandb_watch or pass --allow-partial")


def _precision(name: str):
    def rule(v):
        if v == "auto":
            return {"train.mixed_precision": "auto"}
        if v is True or str(v).lower() == "true":
            return {"train.mixed_precision": name}
        raise Ignored(f"{name} off: tuneforge uses mixed_precision auto (bf16 on a capable GPU, fp32 on CPU)")

    return rule


def _adapter(v):
    if v in ("lora",):
        return {"train.finetune": "lora"}
    if v == "qlora":
        return {"train.finetune": "lora", "model.quantize": "4bit"}
    if v in ("", None):
        return {"train.finetune": "full"}
    raise NotMapped(f"adapter {v!r}: tuneforge trains lora, qlora (lora + model.quantize) or full")


def _val_set_size(v):
    v = float(v)
    if v >= 1:
        return {"data.eval_size": int(v)}
    return {"data.eval_split": v}


def _chat_template(v):
    if v == "tokenizer_default":
        raise Ignored("tuneforge uses the tokenizer's chat template by default")
    if v in BUILTIN_TEMPLATES:
        return {"model.chat_template": v}
    raise NotMapped(f"no built-in tuneforge template {v!r} (built-in: {', '.join(sorted(BUILTIN_TEMPLATES))}); "
                    "use chat_template_jinja")


def _special_tokens(v):
    if not isinstance(v, dict):
        raise NotMapped("expected a mapping like {pad_token: ...}")
    extra = sorted(set(v) - {"pad_token"})
    if extra:
        raise NotMapped(f"tuneforge sets only the pad token (model.pad_token); {', '.join(extra)} not supported")
    return {"model.pad_token": v["pad_token"]}


def _sdpa(v):
    if v is True or str(v).lower() == "true":
        return {"model.attn_implementation": "sdpa"}
    raise Ignored("off: tuneforge picks the attention (model.attn_implementation auto)")


def _xformers(v):
    if v is True or str(v).lower() == "true":
        return {"model.attn_implementation": "auto", NOTE: "xformers is not used: auto picks sdpa or flash-attn (the same attention)"}
    raise Ignored("off: tuneforge picks the attention (model.attn_implementation auto)")


def _group_by_length(v):
    if v is True or str(v).lower() == "true":
        return {"train.group_by_length": True}
    raise Ignored("false: tuneforge does not sort by length")


def _hub_model_id(v):
    # axolotl pushes to hub_model_id at the end of training (the adapter for LoRA): export.hub_push auto does the same.
    return {"export.hub_repo": v, NOTE: "pushed once, at the end of training (token from HF_TOKEN)"}


def _betas(index: int):
    def rule(v):
        betas = [0.9, 0.999]
        betas[index] = float(v)
        return {"train.betas": betas}

    return rule


def _lora_target_linear(v):
    if v is True:
        return {"lora.target_modules": "all-linear"}
    raise Ignored("false: lora.target_modules decides")


def _packing(v):
    return {"data.packing": "bins" if v else "off"}


def _save_strategy(v):
    if v in ("steps", "epoch", "no"):
        raise Ignored("tuneforge checkpoints every train.save_every steps (save_steps) and always saves the final model")
    raise NotMapped(f"unknown save_strategy {v!r}")


def _deepspeed(v):
    return {"train.deepspeed": v}


def _train_on_inputs(v):
    return {"data.train_on": "all" if v else "assistant"}


def _rl(v):
    if v in ("dpo", "orpo", "simpo", "kto"):
        return {"train.method": v}
    raise NotMapped(f"rl {v!r}: tuneforge has no such method")


def _wandb(sub: str):
    return to(f"tracking.wandb.{sub}")


RULES: dict[str, Any] = {
    # model
    "base_model": to("model.path"),
    "base_model_config": ignored("tuneforge reads the model config from model.path"),
    "revision_of_model": to("model.revision"),
    "tokenizer_config": to("model.tokenizer"),
    "model_type": same_as({"AutoModelForCausalLM"}, HF_CLASSES),
    "tokenizer_type": _tokenizer_type,
    "trust_remote_code": to("model.trust_remote_code"),
    "hub_model_id": _hub_model_id,
    "is_falcon_derived_model": ignored(ARCH), "is_llama_derived_model": ignored(ARCH),
    "is_qwen_derived_model": ignored(ARCH), "is_mistral_derived_model": ignored(ARCH),
    "overrides_of_model_config": not_mapped("tuneforge does not override the model config (RoPE scaling etc.)"),
    "load_in_8bit": flag("model.quantize", "8bit", "false: weights are not quantized"),
    "load_in_4bit": flag("model.quantize", "4bit", "false: weights are not quantized"),
    "bf16": _precision("bf16"),
    "fp16": _precision("fp16"),
    "tf32": flag("train.tf32", True, "false: tuneforge leaves TF32 matmuls off"),
    "gpu_memory_limit": not_mapped("tuneforge has no per-GPU memory cap; use model.device_map"),
    "lora_on_cpu": not_mapped("tuneforge keeps LoRA weights with the model"),
    "device_map": to("model.device_map"),
    "max_memory": not_mapped("tuneforge has no per-device memory map"),
    # hyper-parameters
    "gradient_accumulation_steps": to("train.grad_accum"),
    "micro_batch_size": to("train.micro_batch_size"),
    "eval_batch_size": to("train.eval_micro_batch_size"),
    "num_epochs": to("train.epochs"),
    "warmup_steps": to("train.warmup_steps"),
    "warmup_ratio": to("train.warmup_ratio"),
    "learning_rate": to("train.lr", float),
    "lr_quadratic_warmup": not_mapped("tuneforge warms up linearly"),
    "logging_steps": to("train.log_every"),
    "eval_steps": to("train.eval_every"),
    "evals_per_epoch": to("train.evals_per_epoch"),
    "save_strategy": _save_strategy,
    "save_steps": to("train.save_every"),
    "saves_per_epoch": to("train.saves_per_epoch"),
    "save_total_limit": to("train.keep_checkpoints"),
    "max_steps": to("train.max_steps"),
    "seed": to("train.seed"),
    # data
    "sequence_len": to("data.max_length"),
    "sample_packing": _packing,
    "eval_sample_packing": ignored("tuneforge evaluates with the same batching as training"),
    "pad_to_sequence_len": ignored("tuneforge pads to the longest sample or packs; fixed-length padding changes no result"),
    "val_set_size": _val_set_size,
    "chat_template": _chat_template,
    "chat_template_jinja": to("model.chat_template"),
    "default_system_message": to("data.system_prompt"),
    "dataset_prepared_path": to("data.cache_dir"),
    "push_dataset_to_hub": empty_or(not_mapped("tuneforge does not push datasets")),
    "dataset_processes": to("data.num_proc"),
    "dataset_keep_in_memory": ignored("tuneforge memory-maps the prepared Arrow cache"),
    "shuffle_merged_datasets": ignored("tuneforge shuffles the mixed data every epoch (train.seed)"),
    "dataset_exact_deduplication": to("data.clean.dedup"),
    "train_on_inputs": _train_on_inputs,
    "group_by_length": _group_by_length,
    "strict": ignored("tuneforge configs are always strict (unknown keys are errors)"),
    # adapter
    "adapter": _adapter,
    "lora_model_dir": to("lora.init_from"),
    "lora_r": to("lora.r"),
    "lora_alpha": to("lora.alpha"),
    "lora_dropout": to("lora.dropout"),
    "lora_target_modules": to("lora.target_modules"),
    "lora_target_linear": _lora_target_linear,
    "peft_layers_to_transform": empty_or(to("lora.layers_to_transform")),
    "lora_modules_to_save": empty_or(to("lora.modules_to_save")),
    "lora_fan_in_fan_out": flag("lora.fan_in_fan_out", True, "false: peft's default"),
    # optimisation
    "gradient_checkpointing": to("train.gradient_checkpointing", bool),
    "early_stopping_patience": to("train.early_stopping_patience"),
    "lr_scheduler": to("train.lr_scheduler"),
    "lr_scheduler_kwargs": empty_or(not_mapped("tuneforge schedules take no extra kwargs")),
    "cosine_min_lr_ratio": to("train.min_lr_ratio"),
    "cosine_constant_lr_ratio": not_mapped("tuneforge has no constant tail for cosine"),
    "lr_div_factor": not_mapped("one-cycle schedules are not in tuneforge"),
    "optimizer": optimizer,
    "optim_args": empty_or(not_mapped("tuneforge takes no free-form optimizer args")),
    "optim_target_modules": empty_or(not_mapped("per-module optimizers (GaLore) are not in tuneforge")),
    "weight_decay": to("train.weight_decay", float),
    "adam_beta1": _betas(0),
    "adam_beta2": _betas(1),
    "adam_epsilon": to("train.adam_epsilon"),
    "max_grad_norm": to("train.max_grad_norm"),
    "neftune_noise_alpha": to("train.neftune_alpha"),
    "torch_compile": flag("train.compile", True, "false: no compilation"),
    "dpo_beta": to("preference.beta"),
    "rl_beta": to("preference.beta"),
    "rl": _rl,
    "loss_watchdog_threshold": to("train.loss_watchdog_threshold"),
    "loss_watchdog_patience": to("train.loss_watchdog_patience"),
    # attention
    "flash_attention": flash_on,
    "sdp_attention": _sdpa,
    "xformers_attention": _xformers,
    "flash_optimum": not_mapped("BetterTransformer is deprecated; tuneforge uses sdpa"),
    "flash_attn_cross_entropy": not_mapped("fused kernels from flash-attn are not used by tuneforge"),
    "flash_attn_rms_norm": not_mapped("fused kernels from flash-attn are not used by tuneforge"),
    "flash_attn_fuse_qkv": not_mapped("fused kernels from flash-attn are not used by tuneforge"),
    "flash_attn_fuse_mlp": not_mapped("fused kernels from flash-attn are not used by tuneforge"),
    "s2_attention": not_mapped("shifted sparse attention is not in tuneforge"),
    # tokenizer
    "special_tokens": _special_tokens,
    "tokens": empty_or(to("model.add_tokens")),
    # distributed
    "fsdp": empty_or(lambda v: {"train.fsdp": True}),
    "fsdp_config": empty_or(not_mapped("tuneforge's FSDP2 setup decides wrapping and state-dict type")),
    "deepspeed": _deepspeed,
    "ddp_timeout": not_mapped("tuneforge uses accelerate's default process-group timeout"),
    "ddp_bucket_cap_mb": not_mapped("DDP bucket size is left to torch"),
    "ddp_broadcast_buffers": not_mapped("DDP buffer broadcast is left to torch"),
    # tracking
    "wandb_project": _wandb("project"),
    "wandb_entity": _wandb("entity"),
    "wandb_name": _wandb("name"),
    "wandb_watch": _wandb_watch,
    "wandb_run_id": not_mapped("tuneforge names W&B runs with wandb_name"),
    "wandb_log_model": not_mapped("tuneforge does not upload checkpoints to W&B"),
    "wandb_api_key": secret("WANDB_API_KEY"),
    "hf_token": secret("HF_TOKEN"),
    # output
    "output_dir": to("output.dir"),
}

# What axolotl trains with when its config leaves a setting out (only what changes the trained result). Read from
# axolotl-ai-cloud/axolotl src/axolotl/utils/schemas/{config,training,peft}.py (sequence_len 512, micro_batch_size 1,
# val_set_size 0.0, adapter None = full fine-tune, lr_scheduler cosine, optimizer adamw_torch_fused, ...) and
# src/axolotl/core/builders/base.py (no warmup keys: min(int(0.03 x steps), 100) warmup steps); seed and max_grad_norm
# unset leave transformers' 42 and 1.0. learning_rate and lora_r/lora_alpha have no default (axolotl requires them).
# A default equal to tuneforge's is skipped when importing; listed so a change on either side shows up.
DEFAULTS = (
    Default("adapter", {"train.finetune": "full"}, "none: every weight is trained"),
    Default("micro_batch_size", {"train.micro_batch_size": 1}),
    Default("gradient_accumulation_steps", {"train.grad_accum": 1}),
    Default("num_epochs", {"train.epochs": 1.0}),
    Default("sequence_len", {"data.max_length": 512}),
    Default("val_set_size", {"data.eval_split": 0.0}, "0: nothing held out of the training data"),
    Default("warmup_ratio", {"train.warmup_ratio": 0.03}, "3% of the steps, which axolotl caps at 100: the same for runs "
            "up to 3,333 steps", also=("warmup_steps",)),
    Default("lr_scheduler", {"train.lr_scheduler": "cosine"}),
    Default("optimizer", {"train.optimizer": "adamw"}, "adamw_torch_fused"),
    Default("weight_decay", {"train.weight_decay": 0.0}),
    Default("lora_dropout", {"lora.dropout": 0.0}),
    Default("train_on_inputs", {"data.train_on": "assistant"}),
    Default("gradient_checkpointing", {"train.gradient_checkpointing": False}),
)

DATASET_RULES = {
    "path": "path", "data_files": "path", "split": "split", "train_on_split": "split", "name": "subset",
}
DATASET_KEYS = {*DATASET_RULES, "type", "ds_type"}


def _dataset(t: Translator, section: str, i: int, item: Any, prefix: str) -> None:
    where = f"{prefix}[{i}]"
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        t.apply(where, item, not_mapped("expected a mapping with path/type"), "")
        return
    base = f"data.{section}.{i}"
    # data_files names the local file when `path` is a loader name (json, csv, parquet).
    loader_path = item.get("path") in ("json", "csv", "parquet", "text") and "data_files" in item
    for key, value in item.items():
        if key == "path" and loader_path:
            t.apply(f"{where}.path", value, ignored("a loader name: data_files gives the file"), "")
        elif key == "data_files":
            files = value if isinstance(value, list) else [value]
            rule = (lambda v, f=files: {f"{base}.path": f[0]}) if (loader_path or "path" not in item) and len(files) == 1 \
                else not_mapped("tuneforge reads one file per dataset entry (list each file as its own entry)")
            t.apply(f"{where}.data_files", value, rule, "")
        elif key == "type":
            t.apply(f"{where}.type", value, lookup(f"{base}.format", DATASET_TYPES, "prompt format"), "")
        elif key == "ds_type":
            t.apply(f"{where}.ds_type", value, ignored("tuneforge detects the file type from its extension"), "")
        elif key in DATASET_RULES:
            t.apply(f"{where}.{key}", value, to(f"{base}.{DATASET_RULES[key]}"), "")
        else:
            t.apply(f"{where}.{key}", value, None, f"dataset option {key!r} has no tuneforge equivalent", DATASET_KEYS)


def translate(args: dict[str, Any], source: str = "axolotl config") -> ImportResult:
    t = Translator(source, known={*RULES, "datasets", "test_datasets"})
    rules = dict(RULES)
    if not args.get("test_datasets") and not positive(args.get("val_set_size")):
        no_eval = ignored("no eval data (val_set_size 0, no test_datasets): axolotl does not evaluate")
        rules.update(eval_steps=no_eval, evals_per_epoch=no_eval)
    for key, value in args.items():
        if key in ("datasets", "test_datasets"):
            section = "train" if key == "datasets" else "eval"
            items = value if isinstance(value, list) else [value]
            if not items:
                t.apply(key, value, ignored("empty list"), "")
            for i, item in enumerate(items):
                _dataset(t, section, i, item, key)
            continue
        t.apply(key, value, rules.get(key), f"unknown axolotl key {key!r}: no tuneforge equivalent")
    t.source_defaults(args, DEFAULTS, "axolotl")
    return t.finish({"model.path": "base_model", "model": "base_model", "data.train": "datasets", "data": "datasets"})
