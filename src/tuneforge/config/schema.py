"""The one config schema. Every field has a one-line description that becomes `config schema` docs.

Closed by construction: `extra="forbid"` on every section, so a misspelled key is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Section(BaseModel):
    # allow_inf_nan=False: inf/nan in any float (lr, alpha, betas, weights) is an error, not a NaN run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Upper bounds: far above any real use, low enough that a typo (1e30, an extra zero run) fails here, not in torch.
MAX_TOKENS = 1 << 20  # tokens per sample / block / bin
MAX_COUNT = 10**9  # steps, samples
MAX_SEED = 2**32 - 1  # numpy's seed range
SQL_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".sql")
_VAR = re.compile(r"\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_path(value):
    """`${VAR}` / `$VAR` / `~` in a path are expanded; an unset variable is an error (never a folder named '${VAR}')."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        raise ValueError("is empty (give a path)")

    def sub(m: re.Match) -> str:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"'${{{name}}}' in {value!r} is not an environment variable reference (write ${{NAME}})")
        if name not in os.environ:
            raise ValueError(f"environment variable {name} in {value!r} is not set (export it, or write the path out)")
        return os.environ[name]

    return os.path.expanduser(_VAR.sub(sub, value))


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(".gguf") or Path(path).exists()


class ModelConfig(Section):
    path: str = Field(description="Base model: a local HF directory, a .gguf file, or a hub id (org/name).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) when `path` is a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bf16 on a capable GPU, fp32 on CPU."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto = sdpa (flash_attention_2 needs a GPU and flash-attn)."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (off unless you trust it).")
    chat_template: Optional[str] = Field(
        None, description="Override the tokenizer's chat template: a built-in name (chatml, llama3, alpaca, ...), a .jinja file, or a jinja string."
    )
    pad_token: Optional[str] = Field(None, description="Pad token to use when the tokenizer has none (default: its EOS token).")

    _path = field_validator("path", mode="before")(expand_path)

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
    path: Optional[str] = Field(None, description="A file (.jsonl .json .csv .tsv .parquet .txt .html .db .sql), a directory, a save_to_disk dir, or a hub dataset id.")
    custom: Optional[str] = Field(None, description="A registered custom dataset name or 'module:attr' (instead of path).")
    options: dict = Field(default_factory=dict, description="Keyword options passed to a custom dataset.")
    format: Literal["auto", "messages", "alpaca", "sharegpt", "input_output", "text", "oasst", "preference", "tool_calls"] = Field(
        "auto", description="Row format; auto detects from the row's keys (text = plain corpus, all tokens trained)."
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
        if self.samples is not None and "weight" in self.model_fields_set:
            raise ValueError("samples and weight both set: samples takes an exact row count, weight scales it (keep one)")
        if self.text_unit != "file" and suffix != ".txt" and self.path and not Path(self.path).is_dir():
            raise ValueError(f"text_unit: applies to .txt files, not {self.path!r} (remove text_unit)")
        return self

    _path = field_validator("path", mode="before")(expand_path)

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
    cache_dir: str = Field(".cache/tuneforge/data", description="Where tokenized data is cached, keyed by content hash.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for the train/eval split.")
    allow_code: bool = Field(False, description="Let `custom: 'module:attr'` import and run Python code named by this config "
                             "(such a config is code: only enable for configs you trust; or set TUNEFORGE_ALLOW_CODE=1).")

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_bool(cls, v):
        return {True: "padding_free", False: "off"}.get(v, v) if isinstance(v, bool) else v

    _cache_dir = field_validator("cache_dir", mode="before")(expand_path)

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataConfig":
        explicit_split = "eval_split" in self.model_fields_set and self.eval_split > 0  # 0 = "no fraction": compatible
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

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v):
        if isinstance(v, list) and (not v or not all(m.strip() for m in v)):
            raise ValueError("give 'all-linear' or a non-empty list of module names")
        return v


class GenerateEval(Section):
    samples: int = Field(0, ge=0, le=100_000, description="Eval prompts answered greedily before and after training (0 = off).")
    max_new_tokens: int = Field(64, ge=1, le=32_768, description="Tokens generated per eval prompt.")
    metric: Literal["exact", "json"] = Field(
        "exact", description="exact = stripped string equality; json = parsed JSON objects equal."
    )


class TrainConfig(Section):
    finetune: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter or all weights.")
    epochs: float = Field(1.0, gt=0, le=10_000, description="Passes over the training data (fractions allowed).")
    max_steps: Optional[int] = Field(None, ge=1, le=MAX_COUNT, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(4, ge=1, le=65_536, description="Samples per forward pass per process.")
    grad_accum: int = Field(1, ge=1, le=65_536, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Schedule after warmup.")
    warmup_steps: Optional[int] = Field(None, ge=0, le=MAX_COUNT, description="Warmup steps (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, le=1e6, description="Gradient clipping norm (null = off).")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for init, data order and dropout.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto = bf16 on a capable GPU, none on CPU.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory by recomputing activations.")
    log_every: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    eval_every: Optional[int] = Field(None, ge=1, description="Eval loss every N steps (and always at the end).")
    save_every: Optional[int] = Field(None, ge=1, description="Checkpoint every N steps (resumable with --resume).")
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
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set and self.warmup_ratio > 0:
            raise ValueError("warmup_steps and warmup_ratio both set (keep one)")
        if self.warmup_steps and self.max_steps and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) >= max_steps ({self.max_steps}): the run would end "
                             "before the learning rate peaks (lower warmup_steps)")
        return self


class OutputConfig(Section):
    dir: str = Field("runs/run", description="Run directory: config, metrics, checkpoints and the final adapter/model.")
    overwrite: bool = Field(False, description="Allow training into a directory that already holds a finished run.")

    _dir = field_validator("dir", mode="before")(expand_path)


class WandbConfig(Section):
    project: str = Field(description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B team or user.")
    name: Optional[str] = Field(None, description="Run name (default: the run directory's name).")


class MlflowConfig(Section):
    uri: str = Field("file:./mlruns", description="Tracking URI: a server URL or file:PATH for a local store.")
    experiment: str = Field("tuneforge", description="Experiment name.")


class TrackingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under RUN_DIR/tensorboard.")
    plot: bool = Field(True, description="Write RUN_DIR/loss.png at the end.")
    wandb: Optional[WandbConfig] = Field(None, description="Log to Weights & Biases (opt-in; WANDB_MODE=offline works without network).")
    mlflow: Optional[MlflowConfig] = Field(None, description="Log to MLflow (opt-in; a file:// uri needs no server).")


class Config(Section):
    """A tuneforge run: model, data, train, adapter, output, tracking."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # Where the config was read from (set by load_config): its folder is never overwritten by a run.
    _config_path: Optional[Path] = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_combinations(self) -> "Config":
        # Impossible combinations fail here, in the first second, never after loading weights.
        has_eval = bool(self.data.eval or self.data.eval_split > 0 or self.data.eval_size)
        if self.train.generate_eval.samples and not has_eval:
            raise ValueError("train.generate_eval.samples needs eval data: set data.eval, data.eval_split or data.eval_size")
        if self.train.eval_every and not has_eval:
            raise ValueError("train.eval_every needs eval data: set data.eval, data.eval_split or data.eval_size")
        if self.train.finetune == "full" and "lora" in self.model_fields_set and self.lora.model_fields_set:
            raise ValueError(f"lora.{sorted(self.lora.model_fields_set)[0]}: LoRA settings do nothing with train.finetune: full "
                             "(remove the lora section, or set train.finetune: lora)")
        if self.data.clean.max_per_cluster and not self.data.clean.clusters:
            raise ValueError("data.clean.max_per_cluster needs data.clean.clusters (the number of clusters)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)

    @property
    def config_path(self) -> Optional[Path]:
        return self._config_path
