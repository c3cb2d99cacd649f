"""X—LLM config (seed 000's config reference) -> tuneforge config."""

from __future__ import annotations

from typing import Any

from tuneforge.config.importers.table import (
    NOTE, Default, Ignored, ImportResult, NotMapped, Translator, empty_or, fast_tokenizer_only, flag, flash_on, ignored, not_mapped, optimizer,
    same_as, secret, to, when,
)

FUSE = "fusing another run's adapter is its own step in tuneforge: `tuneforge merge RUN_DIR --out DIR`"
NO_GPTQ = ("applies to X—LLM's separate GPTQ step only (quantization_after_fusing is off): in tuneforge "
           "`tuneforge quantize RUN_DIR --method gptq`, or export.quantize")
GENERAL = ("default", "general")  # X—LLM's registry keys for "the rows are in train_local_path_to_data"


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


def _default_only(default, reason: str):
    """X—LLM's default is what tuneforge does; any other value cannot be honoured."""

    def rule(v):
        if v == default:
            raise Ignored(f"{v!r} (X—LLM's default): {reason}")
        raise NotMapped(f"{v!r}: {reason}")

    return rule


def _dataset_key(v):
    if v in GENERAL:
        raise Ignored(f"{v!r}: the rows are in train_local_path_to_data")
    return {"data.train.0.custom": str(v),
            NOTE: f"a dataset registered as {v!r} (tuneforge.data.registry.register_dataset) is read when training"}


def _collator(v):
    if v == "lm":  # src/xllm/collators/lm.py: labels are the input ids, every token carries loss
        return {"data.train_on": "all", NOTE: "X—LLM's lm collator puts loss on every token"}
    raise NotMapped(f"{v!r}: custom X—LLM collators have no tuneforge equivalent")


def _optim(v):
    return optimizer(v)


RULES: dict[str, Any] = {
    # general
    "experiment_key": same_as({"base"}, "custom X—LLM experiment classes have no tuneforge equivalent"),
    "save_safetensors": when(ignored("tuneforge always saves safetensors"),
                             not_mapped("tuneforge always saves safetensors (pickle checkpoints are not written)")),
    "max_shard_size": ignored("tuneforge saves with transformers' default shard size (a file layout; the weights are the same)"),
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
    # fuse / quantization (export:, done by `tuneforge train` at the end of the run); see _export_rules
    "lora_hub_model_id": not_mapped(FUSE), "lora_model_local_path": not_mapped(FUSE),
    "fuse_after_training": when(lambda v: {"export.merge": True, NOTE: "fused into RUN_DIR/merged at the end of training"},
                                ignored("false: not fused")),
    "gptq_disable_exllama": ignored("a GPTQ inference-kernel choice; the quantized weights are the same"),
    # dataset
    "dataset_key": _dataset_key,
    "train_local_path_to_data": to("data.train.0.path"),
    "eval_local_path_to_data": to("data.eval", lambda v: [{"path": v}]),
    "shuffle": ignored("tuneforge shuffles the training data every epoch (train.seed)"),
    "max_eval_samples": _max_eval,
    "add_eval_to_train_if_no_path": when(not_mapped("tuneforge never mixes eval rows back into train"),
                                         ignored("false: eval rows stay out of train, as in tuneforge")),
    # tokenizer / collator
    "tokenizer_name_or_path": to("model.tokenizer"),
    "tokenizer_use_fast": fast_tokenizer_only,
    "tokenizer_padding_side": _default_only("right", "tuneforge pads on the right for training (packing needs no padding)"),
    "collator_key": _collator,
    "max_length": to("data.max_length"),
    # model
    "model_name_or_path": to("model.path"),
    "push_to_hub_bos_add_bos_token": _default_only(False, "tuneforge pushes the tokenizer config as trained (add_bos_token unchanged)"),
    "use_flash_attention_2": flash_on,
    "trust_remote_code": to("model.trust_remote_code"),
    "device_map": to("model.device_map"),
    "prepare_model_for_kbit_training": ignored("tuneforge prepares a quantized model for training itself"),
    # bitsandbytes
    "load_in_8bit": flag("model.quantize", "8bit", "false: weights are not quantized"),
    "load_in_4bit": flag("model.quantize", "4bit", "false: weights are not quantized"),
    "llm_int8_threshold": _default_only(6.0, "bitsandbytes' int8 outlier threshold stays at 6.0"),
    "llm_int8_has_fp16_weight": ignored("applies with load_in_8bit only"),
    "bnb_4bit_use_double_quant": to("model.double_quant"),
    "bnb_4bit_quant_type": to("model.quant_type"),
    "bnb_quantize_after_model_init": _default_only(False, "tuneforge quantizes while loading"),
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
    "per_device_eval_batch_size": to("train.eval_micro_batch_size"),
    "gradient_accumulation_steps": to("train.grad_accum"),
    "eval_accumulation_steps": ignored("tuneforge sums eval loss on the device; nothing to accumulate"),
    "eval_delay": _default_only(0, "tuneforge has no eval delay"),
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
    "optim": _optim,
    # wandb
    "report_to_wandb": _wandb_on,
    "wandb_api_key": secret("WANDB_API_KEY"),
    "wandb_project": to("tracking.wandb.project"),
    "wandb_entity": to("tracking.wandb.entity"),
}


def _on(v) -> bool:
    return v is True or str(v).lower() == "true"


def _context_rules(cfg: dict[str, Any]) -> dict[str, Any]:
    """Rules that depend on other keys: what gets fused, quantized and pushed (export:), and where the data is."""
    fuse, push, quant = (_on(cfg.get(k)) for k in ("fuse_after_training", "push_to_hub", "quantization_after_fusing"))
    hub, qhub, key = cfg.get("hub_model_id"), cfg.get("quantized_hub_model_id"), cfg.get("dataset_key")
    pushes_hub = bool(hub) and (push or fuse)  # X—LLM's fuse step pushes the fused model to hub_model_id too
    pushes_qhub = quant and bool(qhub) and not pushes_hub
    at_end = "pushed once, at the end of training (the last artifact made: fused model, else the adapter or model)"
    rules: dict[str, Any] = {
        "push_to_hub": (lambda v: {"export.hub_repo": hub, NOTE: at_end}) if push and hub else
        not_mapped("push_to_hub needs hub_model_id (the repo to push to)") if push else ignored("false: nothing is pushed"),
        "hub_model_id": (lambda v: {"export.hub_repo": v, NOTE: at_end}) if pushes_hub else
        ignored("push_to_hub and fuse_after_training are false: nothing is pushed"),
        "hub_private_repo": to("export.hub_private", _on) if pushes_hub else ignored("no push configured"),
        "fused_model_local_path": not_mapped("tuneforge writes the fused model to RUN_DIR/merged") if fuse else
        ignored("applies to X—LLM's fuse step (fuse_after_training is off)"),
        "quantization_after_fusing": (lambda v: {"export.quantize.method": "gptq"}) if quant else ignored("false: no GPTQ"),
        "gptq_bits": to("export.quantize.bits", int) if quant else ignored(NO_GPTQ),
        "gptq_group_size": to("export.quantize.group_size", int) if quant else ignored(NO_GPTQ),
        "quantization_dataset_id": to("export.quantize.calibration") if quant else ignored(NO_GPTQ),
        "quantization_max_samples": to("export.quantize.samples", int) if quant else ignored(NO_GPTQ),
        "quantized_model_path": _default_only("./quantized_model/", "tuneforge writes the GPTQ model to RUN_DIR/gptq-<bits>bit")
        if quant else ignored(NO_GPTQ),
        "quantized_hub_model_id": (lambda v: {"export.hub_repo": v, "export.hub_push": "gptq", NOTE: at_end}) if pushes_qhub else
        not_mapped("one push per run and hub_model_id gets it: push the GPTQ folder with `tuneforge push RUN_DIR --what gptq`")
        if quant and qhub else ignored(NO_GPTQ),
        "quantized_hub_private_repo": to("export.hub_private", _on) if pushes_qhub else ignored("no GPTQ push configured"),
    }
    if not _on(cfg.get("do_eval")):  # build_training_arguments: evaluation_strategy "no" unless do_eval
        rules["eval_steps"] = ignored("do_eval is false: X—LLM does not evaluate")
    if not _on(cfg.get("apply_lora")):  # X—LLM reads its LoRA keys only with apply_lora
        rules.update(dict.fromkeys(("lora_rank", "lora_alpha", "lora_dropout", "raw_lora_target_modules"),
                                   ignored("apply_lora is false: full fine-tuning, no LoRA")))
    if key is not None and key not in GENERAL:
        rules["train_local_path_to_data"] = ignored(
            f"X—LLM's download step writes dataset_key {key!r}'s rows to this file; tuneforge reads the registered "
            "dataset itself (and caches it in data.cache_dir)")
    return rules


def _lora(cfg: dict[str, Any]) -> bool:
    return _on(cfg.get("apply_lora"))


# What X—LLM trains with when its config leaves a setting out (only what changes the trained result): seed 000's
# config reference (/work/shared/seeds/000_*.txt, "Default value"), as in BobaZooba/xllm src/xllm/core/config.py;
# build_training_arguments (src/xllm/core/dependencies.py) passes no lr_scheduler_type (transformers' linear) and
# the default lm collator (src/xllm/collators/lm.py) labels every token. X—LLM reads its LoRA keys only with
# apply_lora, and evaluates only on eval_local_path_to_data (nothing held out of train).
# A default equal to tuneforge's is skipped when importing; listed so a change on either side shows up.
DEFAULTS = (
    Default("apply_lora", {"train.finetune": "full"}, "false: every weight is trained"),
    Default("lora_rank", {"lora.r": 8}, when=_lora),
    Default("lora_alpha", {"lora.alpha": 32}, when=_lora),
    Default("lora_dropout", {"lora.dropout": 0.1}, when=_lora),
    Default("raw_lora_target_modules", {"lora.target_modules": "all-linear"}, "all", when=_lora),
    Default("per_device_train_batch_size", {"train.micro_batch_size": 2}),
    Default("gradient_accumulation_steps", {"train.grad_accum": 1}),
    Default("num_train_epochs", {"train.epochs": 1.0}),
    Default("learning_rate", {"train.lr": 2e-4}),
    Default("warmup_steps", {"train.warmup_steps": 1000}),
    Default("lr_scheduler_type", {"train.lr_scheduler": "linear"}, "X—LLM has no key for it: transformers' linear"),
    Default("weight_decay", {"train.weight_decay": 0.001}),
    Default("max_grad_norm", {"train.max_grad_norm": 1.0}),
    Default("optim", {"train.optimizer": "paged_adamw_8bit"}),
    Default("seed", {"train.seed": 42}),
    Default("max_length", {"data.max_length": 2048}),
    Default("collator_key", {"data.train_on": "all"}, "lm: loss on every token"),
    Default("eval_local_path_to_data", {"data.eval_split": 0.0}, "none: no eval, nothing held out of the training data"),
    Default("use_gradient_checkpointing", {"train.gradient_checkpointing": False}),
)


def translate(cfg: dict[str, Any], source: str = "X—LLM config") -> ImportResult:
    t = Translator(source, known=RULES.keys() | _context_rules({}).keys())
    rules = {**RULES, **_context_rules(cfg)}
    report_wandb = bool(cfg.get("report_to_wandb"))
    for key, value in cfg.items():
        if key in ("wandb_project", "wandb_entity") and not report_wandb and value is not None:
            t.apply(key, value, ignored("report_to_wandb is false: no W&B logging"), "")
            continue
        t.apply(key, value, rules.get(key), f"unknown X—LLM key {key!r}: no tuneforge equivalent")
    t.source_defaults(cfg, DEFAULTS, "X—LLM")
    need = "train_local_path_to_data or dataset_key"
    return t.finish({"model.path": "model_name_or_path", "model": "model_name_or_path", "data.train": need, "data": need})


__all__ = ["translate", "NotMapped"]
