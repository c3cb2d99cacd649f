"""The one config schema. Every field has a one-line description that becomes `config schema` docs.

Closed by construction: `extra="forbid"` on every section, so a misspelled key is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Section(BaseModel):
    # allow_inf_nan=False: inf/nan in any float (lr, alpha, betas, weights) is an error, not a NaN run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def chosen(self) -> set[str]:
        """Fields given a value other than their default. Conflict checks use this, not `model_fields_set`:
        a saved run config (config.yaml) spells out every default, and must validate again as it was."""
        fields = type(self).model_fields
        return {n for n in self.model_fields_set if getattr(self, n) != fields[n].get_default(call_default_factory=True)}


# Upper bounds: far above any real use, low enough that a typo (1e30, an extra zero run) fails here, not in torch.
MAX_TOKENS = 1 << 20  # tokens per sample / block / bin
MAX_COUNT = 10**9  # steps, samples
MAX_SEED = 2**32 - 1  # numpy's seed range
DEEPSPEED_PRESETS = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")  # files in train/deepspeed/
SQL_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".sql")
ENV_REF = re.compile(r"\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class PathField:
    """Marks a field whose value names a file, folder or URI: `x: Annotated[Optional[str], PathField(...)] = Field(...)`.

    EVERY path-like field MUST carry it. The job server finds a job's paths by this marker alone (config/confine.py walks
    the schema), resolves them and refuses any that leaves the user's workspace; an unmarked path field would let a
    job of a shared server read or write anywhere (tests/test_serve_guest.py fails on a path-like field without it).
    role: read (an input; a hub id when no such file exists), write (a folder the run writes), uri (file:PATH or a URL).
    when: a path only when the value ends with one of these suffixes (otherwise a name or inline text).
    contents: json = a JSON file whose own *_path / *_dir / *_file values are paths too (DeepSpeed)."""

    role: Literal["read", "write", "uri"] = "read"
    when: Optional[tuple[str, ...]] = None
    contents: Optional[Literal["json"]] = None


def plain_path(value):
    """A path as the schema takes it: not empty, no `${VAR}` left. The CLI expands variables when it reads a
    config file (config.load); a config that arrives any other way (the job API) must not reach the
    server's environment, or leave its workspace, through a path."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        raise ValueError("is empty (give a path)")
    ref = ENV_REF.search(value)
    if ref:
        raise ValueError(f"{ref.group(0)!r} in {value!r}: environment variables are expanded only in config files "
                         "read by the tuneforge CLI (write the path out)")
    return value


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(".gguf") or Path(path).exists()


class ModelConfig(Section):
    path: Annotated[str, PathField()] = Field(description="Base model: a local HF directory, a .gguf file, or a hub id (org/name).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) when `path` is a hub id.")
    tokenizer: Annotated[Optional[str], PathField()] = Field(None, description="Tokenizer to use instead of the one in `path`: a local tokenizer folder or a hub id (default: `path`).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bf16 on a capable GPU, fp32 on CPU."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = sdpa (flash_attention_2 needs a GPU and flash-attn)."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (off unless you trust it).")
    chat_template: Annotated[Optional[str], PathField(when=(".jinja", ".j2"))] = Field(
        None, description="Override the tokenizer's chat template: a built-in name (chatml, llama3, alpaca, ...), a .jinja file, or a jinja string."
    )
    pad_token: Optional[str] = Field(None, description="Pad token to use when the tokenizer has none (default: its EOS token).")
    add_tokens: list[str] = Field(default_factory=list, description="New special tokens added to the tokenizer; the embeddings grow (new rows = mean of the old) and train.")
    quantize: Optional[Literal["4bit", "8bit"]] = Field(None, description="Load the base quantized with bitsandbytes (QLoRA = finetune: lora + quantize: 4bit).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (quantize: 4bit).")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bits/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype of the 4-bit matmuls; auto = bf16 on a capable GPU, fp32 on CPU.")
    device_map: Optional[Literal["auto"]] = Field(None, description="auto = split one model too large for one GPU over this machine's GPUs (one process; LoRA/QLoRA).")

    _path = field_validator("path", "tokenizer", mode="before")(plain_path)

    @model_validator(mode="after")
    def _revision_needs_hub(self) -> "ModelConfig":
        if self.revision is not None and _is_local(self.path):
            raise ValueError(f"revision: applies to hub ids only, but path {self.path!r} is local (remove revision)")
        return self


DEFAULT_REFUSALS = [
    "as an ai language model", "as a language model", "i'm sorry, but i cannot", "i cannot fulfill", "i am unable to",
    "i'm unable to", "as an ai assistant", "i don't have personal opinions", "openai", "my knowledge cutoff",
]


class DatasetSpec(Section):
    path: Annotated[Optional[str], PathField()] = Field(None, description="A file (.jsonl .json .csv .tsv .parquet .txt .html .db .sql), a directory, a save_to_disk dir, or a hub dataset id.")
    custom: Optional[str] = Field(None, description="A registered custom dataset name or 'module:attr' (instead of path).")
    options: dict = Field(default_factory=dict, description="Keyword options passed to a custom dataset.")
    format: Literal["auto", "messages", "alpaca", "sharegpt", "input_output", "text", "oasst", "preference", "tool_calls", "kto"] = Field(
        "auto", description="Row format; auto detects from the row's keys (text = plain corpus, all tokens trained; "
        "preference = prompt/conversations + chosen/rejected; kto = messages + boolean label)."
    )
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns to the format's names, e.g. {question: prompt, answer: completion}.")
    roles: dict[str, str] = Field(default_factory=dict, description="ShareGPT role map additions, e.g. {bot: assistant, person: user}.")
    text_unit: Literal["file", "line"] = Field("file", description="For .txt files: one document per file or per line.")
    query: Optional[str] = Field(None, description="SQL query for .db/.sqlite/.sql sources; its column names are the row keys.")
    split: str = Field("train", description="Split to read from a hub dataset or a DatasetDict directory.")
    subset: Optional[str] = Field(None, description="Hub dataset configuration name.")
    weight: float = Field(1.0, gt=0, le=1000, description="Mixing weight: rows are sampled weight x count times (0.5 = half, 2 = twice).")
    samples: Optional[int] = Field(None, ge=1, le=MAX_COUNT, description="Take exactly this many rows from this dataset (sampled with the data seed).")

    @model_validator(mode="after")
    def _one_source(self) -> "DatasetSpec":
        if (self.path is None) == (self.custom is None):
            raise ValueError("each dataset needs exactly one of 'path' or 'custom'")
        suffix = Path(self.path[:-3] if self.path and self.path.endswith(".gz") else self.path or "").suffix.lower()
        if self.query is not None and suffix not in SQL_SUFFIXES:
            raise ValueError(f"query: applies to SQL sources ({', '.join(SQL_SUFFIXES)}), not {self.path or self.custom!r} (remove query)")
        if self.samples is not None and "weight" in self.chosen():
            raise ValueError("samples and weight both set: samples takes an exact row count, weight scales it (keep one)")
        if self.text_unit != "file" and suffix != ".txt" and self.path and not Path(self.path).is_dir():
            raise ValueError(f"text_unit: applies to .txt files, not {self.path!r} (remove text_unit)")
        return self

    _path = field_validator("path", mode="before")(plain_path)

    @property
    def name(self) -> str:
        return self.path or f"custom:{self.custom}"


class CleanConfig(Section):
    dedup: bool = Field(True, description="Drop exact duplicates (normalised text: case and whitespace folded).")
    near_dedup: Optional[float] = Field(None, gt=0, le=1, description="Drop near-duplicates above this MinHash Jaccard similarity (e.g. 0.85).")
    drop_refusals: bool = Field(False, description="Drop samples whose assistant text contains a refusal/boilerplate phrase.")
    refusal_phrases: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS), description="Phrases (case-insensitive) for drop_refusals.")
    min_tokens: Optional[int] = Field(None, ge=1, description="Drop samples shorter than this many tokens.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Drop (instead of truncating) samples longer than this many tokens.")
    languages: Optional[list[str]] = Field(None, description="Keep only samples detected as these ISO 639-1 languages, e.g. [en, de].")
    clusters: Optional[int] = Field(None, ge=2, le=100_000, description="Cluster samples (TF-IDF + k-means) into this many groups for diversity.")
    max_per_cluster: Optional[int] = Field(None, ge=1, description="With clusters: keep at most this many samples per cluster.")

    @model_validator(mode="after")
    def _min_below_max(self) -> "CleanConfig":
        if self.min_tokens and self.max_tokens and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens}): every sample would be dropped (swap or fix them)")
        return self


class DataConfig(Section):
    train: list[DatasetSpec] = Field(description="Training datasets, mixed (see weight / samples).", min_length=1)
    eval: list[DatasetSpec] = Field(default_factory=list, description="Explicit eval files; if empty, `eval_split` of train is held out.")
    eval_split: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of train held out for eval when no eval files are given.")
    eval_size: Optional[int] = Field(None, ge=1, description="Hold out exactly this many samples for eval (instead of eval_split).")
    max_eval_samples: Optional[int] = Field(None, ge=1, description="Cap on the number of eval samples.")
    max_length: int = Field(1024, ge=8, le=MAX_TOKENS, description="Maximum tokens per sample; longer samples are truncated (counted in the report).")
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="Which tokens carry loss: assistant turns (+ their end token), everything, or the last assistant turn."
    )
    empty_replies: Literal["train_end_token", "bad_row"] = Field(
        "train_end_token", description="An empty or whitespace-only assistant reply: train only its own end-of-turn token, or make the row a bad row (see on_bad_row)."
    )
    system_prompt: Optional[str] = Field(None, description="System prompt added to conversations that have none.")
    packing: Literal["off", "padding_free", "bins"] = Field(
        "padding_free",
        description="off = right-padded batches; padding_free = each micro-batch's samples concatenated in one row "
        "(positions restart, no padding); bins = whole samples packed into bins of pack_length tokens "
        "(best-fit decreasing), micro_batch_size counts bins. true/false mean padding_free/off.",
    )
    pack_length: Optional[int] = Field(None, ge=8, le=MAX_TOKENS, description="Tokens per bin for packing: bins (default: max_length).")
    group_texts: bool = Field(False, description="Corpus mode: concatenate all samples and cut into block_size blocks (pre-training style).")
    block_size: int = Field(512, ge=8, le=MAX_TOKENS, description="Block length for group_texts.")
    num_proc: int = Field(1, ge=1, le=1024, description="Worker processes for rendering + tokenizing. 1 already keeps every core busy tokenizing (Rust threads); more helps on many-core machines with large data.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Dedup, filters, language and diversity selection.")
    on_bad_row: Literal["error", "skip"] = Field("error", description="A malformed row stops the run (error) or is counted and skipped.")
    pair_truncation: Literal["keep_end", "completion_first", "prompt_first"] = Field(
        "keep_end", description="Preference pairs / KTO rows longer than max_length (cuts counted in the data report): "
        "keep_end keeps the prompt and cuts the completions' ends, and a prompt that alone fills max_length keeps its end "
        "(newest max_length/2 tokens, as TRL's keep_end); completion_first is the same but such a prompt is a bad row "
        "(data.on_bad_row: error stops the run); prompt_first first drops the prompt's oldest tokens (down to max_length/2).")
    cache_dir: Annotated[str, PathField("write")] = Field(".cache/tuneforge/data", description="Where tokenized data is cached, keyed by content hash.")
    export_dir: Annotated[Optional[str], PathField("write")] = Field(None, description="Also write the prepared data here as JSONL: cleaned.jsonl (after cleaning), train.jsonl and val.jsonl (the split), export.json (counts).")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for the train/eval split.")
    allow_code: bool = Field(False, description="Let `custom: 'module:attr'` import and run Python code named by this config "
                             "(such a config is code: only enable for configs you trust; or set TUNEFORGE_ALLOW_CODE=1).")

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_bool(cls, v):
        return {True: "padding_free", False: "off"}.get(v, v) if isinstance(v, bool) else v

    _cache_dir = field_validator("cache_dir", "export_dir", mode="before")(plain_path)

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataConfig":
        explicit_split = "eval_split" in self.chosen() and self.eval_split > 0  # 0 = "no fraction": compatible
        if self.eval and (explicit_split or self.eval_size):
            raise ValueError(f"data.eval files and data.{'eval_split' if explicit_split else 'eval_size'} both set: "
                             "the eval files are the eval set (remove one)")
        if self.eval_size and explicit_split:
            raise ValueError("data.eval_size and data.eval_split both set (keep one: a row count or a fraction)")
        return self

    @model_validator(mode="after")
    def _pack_length_fits(self) -> "DataConfig":
        if self.pack_length is not None and self.packing != "bins":
            raise ValueError("data.pack_length applies to data.packing: bins; set packing: bins or remove pack_length")
        longest = self.block_size if self.group_texts else self.max_length
        if self.pack_length is not None and self.pack_length < longest:
            raise ValueError(f"data.pack_length ({self.pack_length}) must hold the longest sample "
                             f"({'block_size' if self.group_texts else 'max_length'} = {longest}): raise it or lower that")
        return self

    @model_validator(mode="after")
    def _code_needs_opt_in(self) -> "DataConfig":
        # A config a user receives must not run arbitrary callables (e.g. subprocess:Popen) unless they opt in.
        import os

        refs = [s.custom for s in (*self.train, *self.eval) if s.custom and ":" in s.custom]
        if refs and not self.allow_code and os.environ.get("TUNEFORGE_ALLOW_CODE") != "1":
            raise ValueError(f"data: custom: {refs[0]!r} imports and runs Python code named by the config; set "
                             "data.allow_code: true (or TUNEFORGE_ALLOW_CODE=1) only if you trust this config")
        return self

    @property
    def bin_tokens(self) -> int:
        """Capacity of a packing bin."""
        return self.pack_length or (self.block_size if self.group_texts else self.max_length)


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32, gt=0, le=10_000, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names (q_proj, v_proj, ...)."
    )
    rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r (stable at high rank).")
    dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (a trained magnitude per output).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained fully and saved with the adapter (e.g. lm_head, embed_tokens).")
    layers_to_transform: Optional[list[int]] = Field(None, description="Adapt only these decoder layer indices (default: all).")
    init_from: Annotated[Optional[str], PathField()] = Field(None, description="Start from an existing LoRA adapter directory (its adapter_config decides r, targets, ...).")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v):
        if isinstance(v, list) and (not v or not all(m.strip() for m in v)):
            raise ValueError("give 'all-linear' or a non-empty list of module names")
        return v


class FreezeConfig(Section):
    layers: Optional[int] = Field(None, ge=1, le=10_000, description="finetune: freeze - train only the top (last) N decoder layers.")
    modules: list[str] = Field(default_factory=list, description="finetune: freeze - also train parameters whose name matches one of these regexes (e.g. 'lm_head', 'mlp').")


class GenerateEval(Section):
    samples: int = Field(0, ge=0, le=100_000, description="Eval prompts answered greedily before and after training (0 = off).")
    max_new_tokens: int = Field(64, ge=1, le=32_768, description="Tokens generated per eval prompt.")
    metric: Literal["exact", "json"] = Field(
        "exact", description="exact = stripped string equality; json = parsed JSON objects equal."
    )


class TrainConfig(Section):
    method: Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo"] = Field(
        "sft", description="Training method: sft (supervised), or preference training on chosen/rejected data: dpo, orpo, simpo, kto (see `preference:`), or grpo: online RL on prompts with reward functions (see `grpo:`).")
    finetune: Literal["lora", "full", "freeze"] = Field("lora", description="Train a LoRA adapter, all weights, or only some (freeze: see train.freeze).")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="finetune: freeze - which parameters train; everything else is frozen.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "lion", "lion_8bit", "sgd", "adagrad"] = Field(
        "adamw", description="Optimizer: adamw (torch; fused on GPU), adamw_8bit / paged_adamw_8bit / lion / lion_8bit (bitsandbytes), adafactor (transformers), sgd, adagrad.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    epochs: float = Field(1.0, gt=0, le=10_000, description="Passes over the training data (fractions allowed).")
    max_steps: Optional[int] = Field(None, ge=1, le=MAX_COUNT, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(4, ge=1, le=65_536, description="Samples per forward pass per process.")
    micro_batch_tokens: Optional[int] = Field(
        None, ge=8, le=1_048_576, description="Token budget per forward pass instead of a sample count: each micro-batch is "
        "one padding-free row of whole samples filling up to this many tokens (best-fit bins). Keeps a GPU busy; "
        "sets data.packing: bins, data.pack_length and micro_batch_size: 1.")
    grad_accum: int = Field(1, ge=1, le=65_536, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_epsilon: float = Field(1e-8, gt=0, le=1.0, description="AdamW epsilon (adamw, adamw_8bit, paged_adamw_8bit): the term added to the denominator.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"] = Field(
        "cosine", description="Schedule after warmup: cosine / linear decay to 0, constant (no warmup), constant_with_warmup, cosine_with_min_lr (to lr x min_lr_ratio).")
    min_lr_ratio: float = Field(0.1, ge=0, lt=1, description="cosine_with_min_lr: final lr as a fraction of the peak.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing (0 = off).")
    loss_kernel: Literal["chunked", "fused_linear", "liger"] = Field(
        "chunked", description="Cross-entropy kernel: chunked (logits never upcast to fp32 as a whole), fused_linear "
        "(no logits tensor at all: head matmul + loss in row chunks, plain torch), liger (Liger's fused kernel; GPU, "
        "pip install liger-kernel). fused_linear/liger fall back to chunked for LoRA-adapted heads and ZeRO-3/FSDP.")
    neftune_alpha: Optional[float] = Field(None, gt=0, le=1000, description="NEFTune: uniform noise of scale alpha/sqrt(tokens x hidden) on input embeddings while training (e.g. 5).")
    compile: bool = Field(False, description="torch.compile the model (opt-in; pays off on GPU for long runs).")
    tf32: bool = Field(False, description="Allow TF32 matmuls on Ampere+ GPUs (faster fp32, ~10-bit mantissa).")
    warmup_steps: Optional[int] = Field(None, ge=0, le=MAX_COUNT, description="Warmup steps (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm (null = off).")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for init, data order and dropout.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto = bf16 on a capable GPU, none on CPU.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory by recomputing activations.")
    deepspeed: Annotated[Optional[str], PathField(when=(".json",), contents="json")] = Field(None, description=f"DeepSpeed ZeRO through accelerate: a preset ({', '.join(DEEPSPEED_PRESETS)}) or a DeepSpeed JSON file.")
    fsdp: bool = Field(False, description="Shard weights, gradients and optimizer state with PyTorch FSDP2 through accelerate (GPUs).")
    log_every: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    eval_every: Optional[int] = Field(None, ge=1, description="Eval loss every N steps (and always at the end).")
    save_every: Optional[int] = Field(None, ge=1, description="Checkpoint every N steps (resumable with --resume).")
    saves_per_epoch: Optional[int] = Field(None, ge=1, le=10_000, description="Checkpoints per epoch instead of save_every: turned into save_every once the steps per epoch are known.")
    evals_per_epoch: Optional[int] = Field(None, ge=1, le=10_000, description="Evals per epoch instead of eval_every: turned into eval_every once the steps per epoch are known.")
    eval_micro_batch_size: Optional[int] = Field(None, ge=1, le=65_536, description="Samples (or pairs) per eval forward pass per process (default: micro_batch_size).")
    group_by_length: bool = Field(False, description="Put samples of similar length into the same step (less padding), in an order fixed by the seed; not with data.packing: bins.")
    keep_checkpoints: int = Field(2, ge=1, le=10_000, description="How many recent checkpoints to keep.")
    loss_watchdog_threshold: Optional[float] = Field(None, gt=0, description="Stop the run when the train loss stays above this for loss_watchdog_patience steps (NaN/inf always stops).")
    loss_watchdog_patience: int = Field(3, ge=1, description="Consecutive logged steps above loss_watchdog_threshold before stopping.")
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="Stop when eval loss has not improved for this many evals (needs eval_every).")
    keep_best: bool = Field(False, description="Keep the checkpoint with the lowest eval loss (never deleted by keep_checkpoints) in RUN_DIR/best.")
    generate_eval: GenerateEval = Field(default_factory=GenerateEval, description="Greedy-generation accuracy on eval prompts, before and after.")


    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each AdamW beta must be in [0, 1), got {list(v)} (e.g. [0.9, 0.999])")
        return v

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.warmup_steps is not None and "warmup_ratio" in self.chosen() and self.warmup_ratio > 0:
            raise ValueError("warmup_steps and warmup_ratio both set (keep one)")
        if self.warmup_steps and self.max_steps and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) >= max_steps ({self.max_steps}): the run would end "
                             "before the learning rate peaks (lower warmup_steps)")
        return self

    @model_validator(mode="after")
    def _per_epoch_or_every(self) -> "TrainConfig":
        for per_epoch, every in (("saves_per_epoch", "save_every"), ("evals_per_epoch", "eval_every")):
            if getattr(self, per_epoch) and getattr(self, every):
                raise ValueError(f"train.{per_epoch} and train.{every} both set: keep one")
        if "adam_epsilon" in self.chosen() and self.optimizer not in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
            raise ValueError(f"train.adam_epsilon applies to the AdamW optimizers, not {self.optimizer} (remove it or use adamw)")
        return self

    @model_validator(mode="after")
    def _one_engine(self) -> "TrainConfig":
        if self.deepspeed and self.fsdp:
            raise ValueError("train.deepspeed and train.fsdp both set: pick one engine")
        if self.deepspeed and self.deepspeed not in DEEPSPEED_PRESETS and not self.deepspeed.endswith(".json"):
            raise ValueError(f"train.deepspeed: {self.deepspeed!r} is not a preset ({', '.join(DEEPSPEED_PRESETS)}) or a .json file")
        return self

    @model_validator(mode="after")
    def _method_options_fit(self) -> "TrainConfig":
        warm = bool(self.warmup_steps) or self.warmup_ratio > 0
        if self.lr_scheduler == "constant" and warm:
            raise ValueError("lr_scheduler: constant has no warmup; use constant_with_warmup (or remove the warmup)")
        if "min_lr_ratio" in self.chosen() and self.lr_scheduler != "cosine_with_min_lr":
            raise ValueError(f"min_lr_ratio applies to lr_scheduler: cosine_with_min_lr, not {self.lr_scheduler}")
        if self.finetune == "freeze" and not (self.freeze.layers or self.freeze.modules):
            raise ValueError("finetune: freeze needs train.freeze.layers (top N layers) and/or train.freeze.modules (name regexes)")
        if self.finetune != "freeze" and self.freeze.chosen():
            raise ValueError(f"train.freeze applies to finetune: freeze, not {self.finetune} (remove it or set finetune: freeze)")
        return self


class PreferenceConfig(Section):
    """Preference training (train.method dpo / orpo / simpo / kto); names and defaults follow TRL."""

    beta: Optional[float] = Field(None, gt=0, description="Strength of the preference term; default per method: dpo 0.1, simpo 2.0, kto 0.1 (orpo uses orpo_lambda).")
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge"] = Field("sigmoid", description="DPO loss: sigmoid (DPO; cDPO with label_smoothing), robust (rDPO), ipo or hinge (SLiC).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Probability that a preference label is flipped: cDPO (sigmoid), rDPO (robust), SimPO.")
    orpo_lambda: float = Field(0.1, gt=0, description="ORPO: weight of the odds-ratio term next to the chosen NLL (TRL's beta).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO: target reward margin gamma.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable examples' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable examples' losses.")
    reference: Literal["auto", "adapter_disabled", "frozen_copy", "precomputed"] = Field(
        "auto", description="Reference model for dpo/kto: adapter_disabled (LoRA: the base itself, no copy), frozen_copy (a "
        "second model in memory), precomputed (reference log-probs computed once before training and cached with the data); "
        "auto = adapter_disabled with LoRA, frozen_copy otherwise.")


class RewardSpec(Section):
    """One reward of train.method: grpo (train/recipes/grpo_rewards.py); the completion's reward is the weighted sum."""

    type: Literal["exact_match", "regex", "json", "json_schema", "math", "length", "function"] = Field(
        description="exact_match: the reply equals the row's `column`; regex: `pattern` matches the reply; json: the reply parses "
        "as JSON; json_schema: it validates against `json_schema` (or a per-row schema in `column`); math: its final answer "
        "equals `column` mathematically (math-verify); length: DAPO's soft overlong penalty (0 down to -1); function: your own "
        "`module:function` (needs data.allow_code).")
    weight: float = Field(1.0, ge=-1000, le=1000, description="Weight of this reward in the sum.")
    name: Optional[str] = Field(None, description="Name in logs (rewards/<name>/mean); default the type, or the function's name.")
    column: Optional[str] = Field(None, description="exact_match / math: the prompt rows' column with the reference answer (default answer); json_schema: a column holding each row's schema.")
    pattern: Optional[str] = Field(None, description="regex: a Python regular expression searched in the reply (anchor with ^...$ for the whole reply).")
    json_schema: Optional[dict] = Field(None, description="json_schema: the JSON Schema every reply must satisfy.")
    function: Optional[str] = Field(None, description="function: 'module:function' called as f(completions, completion_ids, prompts, **columns) -> list of float or None.")
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS, description="length: completion tokens at which the penalty reaches -1 (default grpo.max_completion_length).")
    soft_tokens: int = Field(32, ge=1, le=MAX_TOKENS, description="length: the penalty falls linearly over this many tokens before max_tokens.")

    @model_validator(mode="after")
    def _fields_fit_type(self) -> "RewardSpec":
        needs = {"regex": "pattern", "function": "function"}
        allowed = {"exact_match": {"column"}, "math": {"column"}, "regex": {"pattern"}, "json": set(),
                   "json_schema": {"json_schema", "column"}, "length": {"max_tokens", "soft_tokens"}, "function": {"function"}}[self.type]
        extra = sorted(self.chosen() & {"column", "pattern", "json_schema", "function", "max_tokens", "soft_tokens"} - allowed)
        if extra:
            raise ValueError(f"{extra[0]}: does not apply to a {self.type} reward (remove it)")
        if self.type in needs and not getattr(self, needs[self.type]):
            raise ValueError(f"a {self.type} reward needs {needs[self.type]}:")
        if self.type == "json_schema" and (self.json_schema is None) == (self.column is None):
            raise ValueError("a json_schema reward needs exactly one of json_schema: (inline) or column: (a schema per row)")
        if self.type == "regex":
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern: {self.pattern!r} is not a valid regular expression ({exc})") from None
        if self.type == "function" and (":" not in self.function or not all(self.function.partition(":")[::2])):
            raise ValueError(f"function: {self.function!r} must be 'module:function'")
        if self.max_tokens is not None and self.soft_tokens >= self.max_tokens:
            raise ValueError(f"soft_tokens ({self.soft_tokens}) must be below max_tokens ({self.max_tokens})")
        return self

    @property
    def label(self) -> str:
        return self.name or (self.function.partition(":")[2] if self.type == "function" else self.type)


class GRPOConfig(Section):
    """Online RL with group-relative advantages (train.method: grpo); names and defaults follow TRL 1.16's GRPOConfig."""

    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward functions scored on every completion; a completion's reward is their weighted sum.")
    num_generations: int = Field(8, ge=2, le=1024, description="Completions sampled per prompt (a group); train.micro_batch_size x grad_accum counts completions and must be a multiple of it.")
    max_completion_length: int = Field(256, ge=1, le=MAX_TOKENS, description="Most tokens generated per completion; a completion cut here is truncated.")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature (also divides the logits of the trained log-probs, as TRL).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set with this much probability (1 = off).")
    top_k: int = Field(0, ge=0, le=1_000_000, description="Sample among the k most likely tokens (0 = off).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Advantages = reward - group mean, divided by the group's std (group), the whole batch's std (batch), or not at all (none: Dr. GRPO). true/false mean group/none.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="Normalisation: grpo = mean over completions of each one's mean token loss; bnpo = token mean per micro-batch; "
        "dr_grpo = token sum / (completions x max_completion_length); dapo = token mean over the whole step.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range of the policy ratio below: 1 - epsilon (and above, unless epsilon_high).")
    epsilon_high: Optional[float] = Field(None, gt=0, le=100, description="Upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); default epsilon.")
    beta: float = Field(0.0, ge=0, le=1000, description="Weight of the KL penalty to the reference (LoRA: the adapter disabled; full: a frozen copy); 0 = no reference.")
    num_iterations: int = Field(1, ge=1, le=1000, description="Optimizer steps on each generated batch (PPO's mu); the sampling policy's log-probs are kept for the ratio.")
    mask_truncated_completions: bool = Field(False, description="Completions cut at max_completion_length carry no loss (DAPO).")
    generation: Literal["transformers", "vllm"] = Field("transformers", description="Sampling engine: transformers generate (CPU/GPU, LoRA, QLoRA), or vllm (GPU with vLLM installed; not implemented yet: refused).")
    log_samples: int = Field(4, ge=0, le=10_000, description="Completions per logged step written to RUN_DIR/samples.jsonl (prompt, completion, rewards) and shown in the report.")

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_bool(cls, v):
        return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v


class OutputConfig(Section):
    dir: Annotated[str, PathField("write")] = Field("runs/run", description="Run directory: config, metrics, checkpoints and the final adapter/model.")
    overwrite: bool = Field(False, description="Allow training into a directory that already holds a finished run.")

    _dir = field_validator("dir", mode="before")(plain_path)


class WandbConfig(Section):
    project: str = Field(description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B team or user.")
    name: Optional[str] = Field(None, description="Run name (default: the run directory's name).")


class MlflowConfig(Section):
    uri: Annotated[str, PathField("uri")] = Field("file:./mlruns", description="Tracking URI: a server URL or file:PATH for a local store.")
    experiment: str = Field("tuneforge", description="Experiment name.")


class TrackingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under RUN_DIR/tensorboard.")
    plot: bool = Field(True, description="Write RUN_DIR/loss.png at the end.")
    wandb: Optional[WandbConfig] = Field(None, description="Log to Weights & Biases (opt-in; WANDB_MODE=offline works without network).")
    mlflow: Optional[MlflowConfig] = Field(None, description="Log to MLflow (opt-in; a file:// uri needs no server).")


GPTQ_GROUP_SIZES = (-1, 32, 64, 128, 256)  # what GPTQ kernels run (export/gptq.py checks the same)
HUB_REPO = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class QuantizeAfter(Section):
    """GPTQ-quantize the trained model at the end of training, as `tuneforge quantize` does."""

    method: Literal["gptq"] = Field("gptq", description="Quantization method: gptq (GPTQModel; pip install 'tuneforge[gptq]').")
    bits: Literal[4, 8] = Field(4, description="Bits per weight: 4 or 8.")
    group_size: int = Field(128, description="Weights sharing one scale: 32, 64, 128, 256, or -1 (one group per row).")
    calibration: Annotated[Optional[str], PathField()] = Field(None, description="Calibration data file (default: the run's own training data).")
    samples: int = Field(128, ge=1, le=100_000, description="Calibration samples to draw.")

    _calibration = field_validator("calibration", mode="before")(plain_path)

    @field_validator("group_size")
    @classmethod
    def _kernel_group(cls, v):
        if v not in GPTQ_GROUP_SIZES:
            raise ValueError(f"{v}: use 32, 64, 128 or 256 (or -1 for one group per row)")
        return v


class ExportConfig(Section):
    """What happens after a finished training run, in this order: merge -> quantize -> push (main process only)."""

    merge: bool = Field(False, description="Fuse the LoRA adapter into full weights at the end of training (RUN_DIR/merged, as `tuneforge merge`).")
    quantize: Optional[QuantizeAfter] = Field(None, description="GPTQ-quantize the trained model at the end of training (RUN_DIR/gptq-<bits>bit).")
    hub_repo: Optional[str] = Field(None, description="Push to this Hugging Face Hub repo (you/name) at the end of training; token from HF_TOKEN.")
    hub_push: Literal["auto", "adapter", "merged", "gptq"] = Field(
        "auto", description="What to push: auto = the last artifact made (gptq, else merged, else the adapter or full model).")
    hub_private: bool = Field(True, description="Create the hub repo private (an existing repo keeps its visibility).")

    @field_validator("hub_repo")
    @classmethod
    def _repo_id(cls, v):
        if v is not None and (not HUB_REPO.match(v) or "--" in v or ".." in v):
            raise ValueError(f"{v!r} is not a hub repo id (write it as owner/name, e.g. me/my-model)")
        return v

    @model_validator(mode="after")
    def _push_has_its_artifact(self) -> "ExportConfig":
        if self.hub_repo is None and self.chosen() & {"hub_push", "hub_private"}:
            raise ValueError(f"export.{sorted(self.chosen() & {'hub_push', 'hub_private'})[0]} applies to a push: set export.hub_repo (or remove it)")
        if self.hub_push == "merged" and not self.merge:
            raise ValueError("export.hub_push: merged needs export.merge: true (nothing would be merged to push)")
        if self.hub_push == "gptq" and self.quantize is None:
            raise ValueError("export.hub_push: gptq needs export.quantize (nothing would be quantized to push)")
        return self


class Config(Section):
    """A tuneforge run: model, data, train, adapter, output, tracking."""

    model: ModelConfig = Field(description="The base model: hub id or local folder, dtype, quantization, tokenizer.")
    data: DataConfig = Field(description="Training and eval datasets, their formats, cleaning, packing and lengths.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training method and loop: steps, batch, optimizer, schedule, saves, evals.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings (train.finetune lora).")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run folder goes and whether it may be overwritten.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment trackers (MLflow, W&B) the run logs to.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="Preference-training parameters (train.method dpo, orpo, simpo, kto).")
    export: ExportConfig = Field(default_factory=ExportConfig, description="After a finished run: merge, GPTQ-quantize, push to the hub.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="Online RL parameters (train.method grpo): rewards, sampling, clipping, loss normalisation.")
    # Where the config was read from (set by load_config): its folder is never overwritten by a run.
    _config_path: Optional[Path] = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _token_budget(cls, raw):
        # micro_batch_tokens is the token-budget way of saying "bins of N tokens, one bin per micro-batch";
        # expanded here so the rest of the code (and `config show`) sees one batching description.
        train, data = (raw.get("train"), raw.get("data")) if isinstance(raw, dict) else (None, None)
        if not isinstance(train, dict) or not isinstance(data, dict) or train.get("micro_batch_tokens") is None:
            return raw
        budget = train["micro_batch_tokens"]
        if not isinstance(budget, int) or isinstance(budget, bool) or not 8 <= budget <= MAX_TOKENS:
            return raw  # a bad value: the field's own check names train.micro_batch_tokens
        if data.get("packing", "padding_free") not in ("padding_free", "bins", True):
            raise ValueError(f"train.micro_batch_tokens packs samples; it cannot be used with data.packing: {data['packing']}")
        if train.get("micro_batch_size", 1) != 1:
            raise ValueError("train.micro_batch_tokens replaces train.micro_batch_size: remove one of them")
        longest = data.get("block_size", 512) if data.get("group_texts") else data.get("max_length", 1024)
        if isinstance(budget, int) and isinstance(longest, int) and budget < longest:
            raise ValueError(f"train.micro_batch_tokens ({budget}) must hold the longest sample (data.max_length = {longest}): "
                             "raise it or lower data.max_length")
        if data.get("pack_length", budget) != budget:
            raise ValueError("train.micro_batch_tokens sets data.pack_length: remove data.pack_length")
        return {**raw, "train": {**train, "micro_batch_size": 1}, "data": {**data, "packing": "bins", "pack_length": budget}}

    @model_validator(mode="after")
    def _check_combinations(self) -> "Config":
        # Impossible combinations fail here, in the first second, never after loading weights.
        has_eval = bool(self.data.eval or self.data.eval_split > 0 or self.data.eval_size)
        if self.train.generate_eval.samples and not has_eval:
            raise ValueError("train.generate_eval.samples needs eval data: set data.eval, data.eval_split or data.eval_size")
        if self.train.eval_every and not has_eval:
            raise ValueError("train.eval_every needs eval data: set data.eval, data.eval_split or data.eval_size")
        if self.train.evals_per_epoch and not has_eval:
            raise ValueError("train.evals_per_epoch needs eval data: set data.eval, data.eval_split or data.eval_size")
        if self.train.group_by_length and self.data.packing == "bins":
            raise ValueError("train.group_by_length means nothing with data.packing: bins (bins already hold whole samples "
                             "without padding): remove one of them")
        if self.model.quantize and (self.train.deepspeed or self.train.fsdp):
            # bitsandbytes weights are not sharded by ZeRO-3/FSDP here (untested); DDP (--nproc N) works per GPU.
            raise ValueError(f"model.quantize ({self.model.quantize}) with train.{'deepspeed' if self.train.deepspeed else 'fsdp'} "
                             "is not supported: use DDP (--nproc N) or one process, or drop model.quantize")
        if self.train.finetune == "full" and self.lora.chosen():
            raise ValueError(f"lora.{sorted(self.lora.chosen())[0]}: LoRA settings do nothing with train.finetune: full "
                             "(remove the lora section, or set train.finetune: lora)")
        if self.model.device_map and (self.train.deepspeed or self.train.fsdp):
            raise ValueError("model.device_map: auto splits the model inside one process; it cannot be combined with train.deepspeed / train.fsdp")
        if self.model.quantize and self.train.finetune != "lora":
            raise ValueError(f"model.quantize: {self.model.quantize} trains through LoRA only (QLoRA): set train.finetune: lora")
        if self.lora.init_from and self.train.finetune != "lora":
            raise ValueError("lora.init_from needs train.finetune: lora")
        if self.preference.reference == "adapter_disabled" and self.train.finetune != "lora":
            raise ValueError("preference.reference: adapter_disabled needs train.finetune: lora (use frozen_copy or precomputed)")
        if self.data.clean.max_per_cluster and not self.data.clean.clusters:
            raise ValueError("data.clean.max_per_cluster needs data.clean.clusters (the number of clusters)")
        return self

    @model_validator(mode="after")
    def _grpo_fits(self) -> "Config":
        g, t = self.grpo, self.train
        if t.method != "grpo":
            if g.chosen():
                raise ValueError(f"grpo.{sorted(g.chosen())[0]} applies to train.method: grpo, not {t.method} (remove the grpo section)")
            return self
        if not g.rewards:
            raise ValueError("train.method: grpo needs grpo.rewards (e.g. [{type: exact_match, column: answer}])")
        code = [r.function for r in g.rewards if r.type == "function"]
        if code and not self.data.allow_code and os.environ.get("TUNEFORGE_ALLOW_CODE") != "1":
            raise ValueError(f"grpo.rewards: function {code[0]!r} imports and runs Python code named by the config; set "
                             "data.allow_code: true (or TUNEFORGE_ALLOW_CODE=1) only if you trust this config")
        # Refused here, before any data is prepared or a run folder marked: values this version cannot honour.
        if g.generation == "vllm":
            raise ValueError("grpo.generation: vllm is not wired into this version (it would need a CUDA GPU with vLLM "
                             "installed): use grpo.generation: transformers")
        if self.preference.reference == "precomputed":
            raise ValueError("preference.reference: precomputed cannot serve grpo (its completions are generated online): "
                             "use auto, adapter_disabled or frozen_copy")
        if (t.micro_batch_size * t.grad_accum) % g.num_generations:
            raise ValueError(f"train.micro_batch_size x grad_accum ({t.micro_batch_size} x {t.grad_accum}) counts completions per process "
                             f"and step; it must be a multiple of grpo.num_generations ({g.num_generations}) so each prompt's group stays whole")
        refused = [("data.group_texts", self.data.group_texts), ("data.clean", bool(self.data.clean.chosen())),
                   ("data.packing", "packing" in self.data.chosen() and self.data.packing != "off"),
                   ("train.label_smoothing", bool(t.label_smoothing)), ("train.early_stopping_patience", bool(t.early_stopping_patience)),
                   ("train.keep_best", t.keep_best), ("train.generate_eval.samples", bool(t.generate_eval.samples)),
                   ("train.group_by_length", t.group_by_length),
                   ("train.deepspeed", bool(t.deepspeed)), ("train.fsdp", t.fsdp)]
        for name, on in refused:
            if on:
                raise ValueError(f"{name} does not apply to train.method: grpo (it trains on prompts and rewards; its held-out "
                                 "metric is eval_reward) - remove it")
        if g.max_completion_length >= self.data.max_length:
            raise ValueError(f"grpo.max_completion_length ({g.max_completion_length}) leaves no room for the prompt in data.max_length "
                             f"({self.data.max_length}): raise data.max_length or lower max_completion_length")
        return self

    @model_validator(mode="after")
    def _export_fits(self) -> "Config":
        # Checked before training: a step that cannot run must not be found out after an hour of training.
        lora = self.train.finetune == "lora"
        if self.export.merge and not lora:
            raise ValueError(f"export.merge fuses a LoRA adapter; train.finetune: {self.train.finetune} saves full weights "
                             "already (remove export.merge)")
        if self.export.hub_push == "adapter" and self.export.hub_repo and not lora:
            raise ValueError(f"export.hub_push: adapter needs train.finetune: lora (a {self.train.finetune} run has no adapter; use auto)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)

    @property
    def config_path(self) -> Optional[Path]:
        return self._config_path
