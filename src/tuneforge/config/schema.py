"""The one config schema. Every field has a one-line description that becomes `config schema` docs.

Closed by construction: `extra="forbid"` on every section, so a misspelled key is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class DatasetSpec(Section):
    path: str = Field(description="A local file (.jsonl .json .csv .tsv .parquet .txt) or a directory of them.")
    format: Literal["auto", "messages", "alpaca", "sharegpt", "input_output", "text"] = Field(
        "auto", description="Row format; auto detects from the row's keys (text = plain corpus, all tokens trained)."
    )
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns to the format's names, e.g. {question: prompt, answer: completion}.")
    text_unit: Literal["file", "line"] = Field("file", description="For .txt files: one document per file or per line.")


class DataConfig(Section):
    train: list[DatasetSpec] = Field(description="Training files (all rows are used).", min_length=1)
    eval: list[DatasetSpec] = Field(default_factory=list, description="Explicit eval files; if empty, `eval_split` of train is held out.")
    eval_split: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of train held out for eval when no eval files are given.")
    max_eval_samples: Optional[int] = Field(None, ge=1, description="Cap on the number of eval samples.")
    max_length: int = Field(1024, ge=8, description="Maximum tokens per sample; longer samples are truncated (counted in the report).")
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="Which tokens carry loss: assistant turns (+ their end token), everything, or the last assistant turn."
    )
    system_prompt: Optional[str] = Field(None, description="System prompt added to conversations that have none.")
    packing: bool = Field(True, description="Padding-free packing: concatenate samples per micro-batch with restarting position ids.")
    on_bad_row: Literal["error", "skip"] = Field("error", description="A malformed row stops the run (error) or is counted and skipped.")
    cache_dir: str = Field(".cache/tuneforge/data", description="Where tokenized data is cached, keyed by content hash.")
    seed: int = Field(42, description="Seed for the train/eval split.")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names (q_proj, v_proj, ...)."
    )


class GenerateEval(Section):
    samples: int = Field(0, ge=0, description="Eval prompts answered greedily before and after training (0 = off).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per eval prompt.")
    metric: Literal["exact", "json"] = Field(
        "exact", description="exact = stripped string equality; json = parsed JSON objects equal."
    )


class TrainConfig(Section):
    finetune: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter or all weights.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(4, ge=1, description="Samples per forward pass per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Schedule after warmup.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm (null = off).")
    seed: int = Field(42, description="Seed for init, data order and dropout.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto = bf16 on a capable GPU, none on CPU.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory by recomputing activations.")
    log_every: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    eval_every: Optional[int] = Field(None, ge=1, description="Eval loss every N steps (and always at the end).")
    save_every: Optional[int] = Field(None, ge=1, description="Checkpoint every N steps (resumable with --resume).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    generate_eval: GenerateEval = Field(default_factory=GenerateEval, description="Greedy-generation accuracy on eval prompts, before and after.")


class OutputConfig(Section):
    dir: str = Field("runs/run", description="Run directory: config, metrics, checkpoints and the final adapter/model.")
    overwrite: bool = Field(False, description="Allow training into a directory that already holds a finished run.")


class TrackingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under RUN_DIR/tensorboard.")
    plot: bool = Field(True, description="Write RUN_DIR/loss.png at the end.")


class Config(Section):
    """A tuneforge run: model, data, train, adapter, output, tracking."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> "Config":
        # Impossible combinations fail here, in the first second, never after loading weights.
        if self.train.generate_eval.samples and not (self.data.eval or self.data.eval_split > 0):
            raise ValueError("train.generate_eval.samples needs eval data: set data.eval or data.eval_split > 0")
        if self.train.eval_every and not (self.data.eval or self.data.eval_split > 0):
            raise ValueError("train.eval_every needs eval data: set data.eval or data.eval_split > 0")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)
