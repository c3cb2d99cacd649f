"""LLaMA-Factory training arguments (a YAML/JSON file, or a `train_bash.py --flag value ...` command line) -> tuneforge."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config.importers.table import (
    NOTE, Default, Ignored, ImportResult, NotMapped, Translator, fast_tokenizer_only, flag, flash_attention, ignored, lookup, not_mapped,
    optimizer, positive, same_as, secret, to,
)
from tuneforge.errors import UserError

TEMPLATES = {"llama2": "llama2", "llama3": "llama3", "mistral": "mistral", "alpaca": "alpaca", "chatml": "chatml",
             "qwen": "chatml", "gemma": "gemma", "phi": "phi3", "vicuna": "vicuna"}


def parse_command(text: str) -> dict[str, Any]:
    """`accelerate launch src/train_bash.py --stage sft --bf16 ...` -> {"stage": "sft", "bf16": True, ...}.

    The script name is kept under the key `_script` so predict/export commands can be told apart.
    """
    tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    args: dict[str, Any] = {}
    script = next((t for t in tokens if t.endswith(".py")), "")
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if eq:
                args[key] = _scalar(val)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                args[key] = _scalar(tokens[i + 1])
                i += 1
            else:
                args[key] = True
        i += 1
    if not args:
        raise UserError("LLaMA-Factory command: no --flags found (pass a train_bash.py / llamafactory-cli command or a YAML file)")
    return {"_script": Path(script).name, **args}


def _scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 2e-5 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_args(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml", ".json"):
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of LLaMA-Factory arguments")
        return data
    return parse_command(text)


def _stage(v):
    if v == "sft":
        raise Ignored("supervised fine-tuning is tuneforge's default recipe")
    if v == "pt":
        return {"data.train_on": "all"}
    if v in ("dpo", "orpo", "kto"):
        return {"train.method": v}
    raise NotMapped(f"stage {v!r} (reward modelling / PPO) is not in tuneforge")


def _finetuning_type(v):
    if v == "freeze":  # LLaMA-Factory trains the last 2 layers by default (freeze_trainable_layers)
        return {"train.finetune": "freeze", "train.freeze.layers": 2}
    if v in ("lora", "full"):
        return {"train.finetune": v}
    raise NotMapped(f"finetuning_type {v!r}: tuneforge has lora, full, freeze")


def _quant_bit(v):
    if int(v) in (4, 8):
        return {"model.quantize": f"{int(v)}bit"}
    raise NotMapped(f"quantization_bit {v}: tuneforge quantizes to 4 or 8 bits")


def _lora_target(v):
    names = [m.strip() for m in str(v).split(",") if m.strip()]
    return {"lora.target_modules": "all-linear" if names == ["all"] else names}


def _flash_attn(v):
    if v is True or v == "fa2":
        return flash_attention()
    table = {"sdpa": "sdpa", "disabled": "eager", "auto": "auto"}
    if v in table:
        return {"model.attn_implementation": table[v]}
    raise NotMapped(f"flash_attn {v!r}: expected fa2, sdpa, disabled or auto")


def _revision(v):
    if v == "main":
        raise Ignored("main: the hub's default revision")
    return {"model.revision": v}


def _special_tokens(v):
    return {"model.add_tokens": [t.strip() for t in str(v).split(",") if t.strip()]}


def _push_rules(args: dict[str, Any]) -> dict[str, Any]:
    """HF TrainingArguments: push_to_hub pushes to hub_model_id; tuneforge pushes once, at the end (export:)."""
    push, hub = bool(args.get("push_to_hub")), args.get("hub_model_id")
    at_end = "pushed once, at the end of training (token from HF_TOKEN)"
    return {
        "push_to_hub": (lambda v: {"export.hub_repo": hub, NOTE: at_end}) if push and hub else
        not_mapped("push_to_hub needs hub_model_id (the repo to push to)") if push else ignored("false: nothing is pushed"),
        "hub_model_id": (lambda v: {"export.hub_repo": v, NOTE: at_end}) if push else
        ignored("push_to_hub is false: nothing is pushed"),
        "hub_private_repo": to("export.hub_private", bool) if push and hub else ignored("no push configured"),
    }


def _bool_precision(name: str):
    return flag("train.mixed_precision", name, "false: tuneforge picks the precision (mixed_precision auto)")


def _on(v) -> bool:
    return v is True or str(v).lower() in ("true", "1")


def _gradient_checkpointing(v):
    if _on(v):
        return {"train.gradient_checkpointing": True}
    raise Ignored("LLaMA-Factory checkpoints anyway unless disable_gradient_checkpointing: true")


def _val_size(v):
    v = float(v)
    return {"data.eval_size": int(v)} if v >= 1 else {"data.eval_split": v}


RULES: dict[str, Any] = {
    "stage": _stage,
    "do_train": ignored("`tuneforge train` trains"),
    "model_name_or_path": to("model.path"),
    "adapter_name_or_path": to("lora.init_from"),
    "dataset": None,  # handled with dataset_dir / max_samples below
    "dataset_dir": None,
    "max_samples": None,
    "template": lookup("model.chat_template", TEMPLATES, "template"),
    "finetuning_type": _finetuning_type,
    "quantization_bit": _quant_bit,
    "lora_target": _lora_target,
    "lora_rank": to("lora.r"),
    "lora_alpha": to("lora.alpha"),
    "lora_dropout": to("lora.dropout"),
    "output_dir": to("output.dir"),
    "overwrite_cache": ignored("tuneforge's data cache is keyed by content: changed data or settings are re-tokenized"),
    "overwrite_output_dir": to("output.overwrite", bool),
    "per_device_train_batch_size": to("train.micro_batch_size"),
    "per_device_eval_batch_size": to("train.eval_micro_batch_size"),
    "gradient_accumulation_steps": to("train.grad_accum"),
    "lr_scheduler_type": to("train.lr_scheduler"),
    "logging_steps": to("train.log_every"),
    "save_steps": to("train.save_every"),
    "save_total_limit": to("train.keep_checkpoints"),
    "eval_steps": to("train.eval_every"),
    "learning_rate": to("train.lr", float),
    "num_train_epochs": to("train.epochs", float),
    "max_steps": to("train.max_steps"),
    "warmup_steps": to("train.warmup_steps"),
    "warmup_ratio": to("train.warmup_ratio"),
    "weight_decay": to("train.weight_decay", float),
    "max_grad_norm": to("train.max_grad_norm"),
    "seed": to("train.seed"),
    "neftune_noise_alpha": to("train.neftune_alpha"),
    "pref_beta": to("preference.beta"),
    "dpo_beta": to("preference.beta"),
    "freeze_trainable_layers": to("train.freeze.layers"),
    "num_layer_trainable": to("train.freeze.layers"),
    "flash_attn": _flash_attn,
    "bf16": _bool_precision("bf16"),
    "fp16": _bool_precision("fp16"),
    "cutoff_len": to("data.max_length"),
    "val_size": _val_size,
    "packing": to("data.packing", lambda v: "bins" if v else "off"),
    "train_on_prompt": to("data.train_on", lambda v: "all" if v else "assistant"),
    "default_system": to("data.system_prompt"),
    "gradient_checkpointing": _gradient_checkpointing,
    "disable_gradient_checkpointing": to("train.gradient_checkpointing", lambda v: not _on(v)),
    "optim": optimizer,
    "report_to": same_as({"none", "tensorboard"}, "tuneforge logs to TensorBoard; W&B needs tracking.wandb.project"),
    "deepspeed": to("train.deepspeed"),
    "plot_loss": ignored("tuneforge always writes RUN_DIR/loss.png"),
    "trust_remote_code": to("model.trust_remote_code"),
    "use_fast_tokenizer": fast_tokenizer_only,
    "model_revision": _revision,
    "add_special_tokens": _special_tokens,
    "new_special_tokens": _special_tokens,
    "hf_hub_token": secret("HF_TOKEN"),
    "ms_hub_token": secret(None),
    "om_hub_token": secret(None),
    "preprocessing_num_workers": to("data.num_proc"),
    "_script": ignored("the training script's name"),
}


def _cutoff_len(args: dict[str, Any]) -> int:
    # 1024 until v0.9.1 (Nov 2024), 2048 since; train_bash.py commands come from before v0.7 (May 2024).
    return 1024 if args.get("_script") == "train_bash.py" else 2048


def _lora(args: dict[str, Any]) -> bool:
    return args.get("finetuning_type", "lora") == "lora" and not args.get("adapter_name_or_path")


# What LLaMA-Factory trains with when its arguments leave a setting out (only what changes the trained result).
# Read from hiyouga/LLaMA-Factory src/llamafactory/hparams/{finetuning_args,model_args,data_args}.py and parser.py
# (lora_alpha = lora_alpha or lora_rank * 2; packing = stage == "pt"), v0.5-v0.9.x alike except cutoff_len; the
# training loop's from transformers' Seq2SeqTrainingArguments (learning_rate 5e-5, 3 epochs, linear, batch 8, ...).
# A default equal to tuneforge's is skipped when importing; listed so a change on either side shows up.
DEFAULTS = (
    Default("lora_rank", {"lora.r": 8}, when=_lora),
    Default("lora_alpha", {"lora.alpha": lambda a: 2 * int(a.get("lora_rank") or 8)}, "lora_rank x 2", when=_lora),
    Default("lora_dropout", {"lora.dropout": 0.0}, when=_lora),
    Default("lora_target", {"lora.target_modules": "all-linear"}, "all", when=_lora),
    Default("disable_gradient_checkpointing", {"train.gradient_checkpointing": True}, "false: checkpointing on"),
    Default("learning_rate", {"train.lr": 5e-5}),
    Default("num_train_epochs", {"train.epochs": 3.0}),
    Default("lr_scheduler_type", {"train.lr_scheduler": "linear"}),
    Default("warmup_steps", {"train.warmup_ratio": 0.0}, "no warmup", also=("warmup_ratio",)),
    Default("per_device_train_batch_size", {"train.micro_batch_size": 8}),
    Default("gradient_accumulation_steps", {"train.grad_accum": 1}),
    Default("cutoff_len", {"data.max_length": _cutoff_len}),
    Default("val_size", {"data.eval_split": 0.0}, "0: nothing held out of the training data"),
    Default("train_on_prompt", {"data.train_on": "assistant"}),
    Default("packing", {"data.group_texts": True, "data.block_size": lambda a: int(a.get("cutoff_len") or _cutoff_len(a))},
            "stage pt: texts concatenated and cut into cutoff_len blocks", when=lambda a: a.get("stage") == "pt"),
    Default("weight_decay", {"train.weight_decay": 0.0}),
    Default("max_grad_norm", {"train.max_grad_norm": 1.0}),
    Default("seed", {"train.seed": 42}),
    Default("optim", {"train.optimizer": "adamw"}, "adamw_torch(_fused)"),
)


def _datasets(t: Translator, args: dict[str, Any]) -> None:
    names = [n.strip() for n in str(args.get("dataset", "")).split(",") if n.strip()]
    info_dir = Path(str(args.get("dataset_dir", "data")))
    info_file = info_dir / "dataset_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    for i, name in enumerate(names):
        entry = info.get(name)
        if entry and "file_name" in entry:
            path, note = str(info_dir / entry["file_name"]), f"from {info_file}"
        elif entry and ("hf_hub_url" in entry or "ms_hub_url" in entry):
            path, note = entry.get("hf_hub_url") or entry["ms_hub_url"], f"hub dataset from {info_file}"
        else:
            path, note = name, "a LLaMA-Factory dataset name without dataset_info.json: used as a file or hub id"
        t.apply(f"dataset[{i}]", name, lambda v, p=path: {f"data.train.{i}.path": p}, "")
        t.rows[-1].note = note
    if "dataset" not in args:
        return
    if "dataset_dir" in args:
        t.apply("dataset_dir", args["dataset_dir"], ignored(f"read {info_file} to resolve dataset names"), "")
    if "max_samples" in args:
        t.apply("max_samples", args["max_samples"],
                lambda v: {f"data.train.{i}.samples": int(v) for i in range(len(names))}, "")


def translate(args: dict[str, Any], source: str = "LLaMA-Factory arguments") -> ImportResult:
    script = args.get("_script", "")
    if script == "export_model.py" or "export_dir" in args:
        raise UserError(f"{source}: this is a LLaMA-Factory export (merge) command, not training: in tuneforge run "
                        f"`tuneforge merge RUN_DIR --out {args.get('export_dir', 'DIR')}` on the run directory")
    if args.get("do_predict") and not args.get("do_train"):
        raise UserError(f"{source}: this is a LLaMA-Factory prediction command, not training: in tuneforge use "
                        f"`tuneforge generate RUN_DIR --prompt ...` (or `tuneforge predict` when installed) on "
                        f"{args.get('checkpoint_dir', 'the run directory')}")
    t = Translator(source, known=RULES.keys() | _push_rules({}).keys())
    _datasets(t, args)
    rules = {**RULES, **_push_rules(args)}
    if not positive(args.get("val_size")):
        rules["eval_steps"] = ignored("no val_size: LLaMA-Factory does not evaluate")
    if {"freeze_trainable_layers", "num_layer_trainable"} & set(args):
        rules["finetuning_type"] = lookup("train.finetune", {"lora": "lora", "full": "full", "freeze": "freeze"}, "finetuning_type")
    for key, value in args.items():
        if key in ("dataset", "dataset_dir", "max_samples"):
            continue
        t.apply(key, value, rules.get(key), f"unknown LLaMA-Factory argument {key!r}: no tuneforge equivalent")
    t.source_defaults(args, DEFAULTS, "LLaMA-Factory")
    return t.finish({"model.path": "model_name_or_path", "model": "model_name_or_path", "data.train": "dataset", "data": "dataset"})
