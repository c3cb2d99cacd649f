"""Memory planner: peak memory per device and rough time per step, from the model config alone.

The model is built on torch's meta device (shapes, no storage, no weights read), so parameter counts
and the LoRA target layers are exact for any architecture transformers knows. The memory model:

    peak = weights + gradients + optimizer state       (each divided by N when sharded)
         + activations (per layer per token, or one layer's input with checkpointing)
         + logits (full vocabulary, kept for the loss and its gradient)
         + a fixed runtime overhead (CUDA context, allocator slack)

Bytes per element follow what tuneforge runs: weights at model.dtype (4-bit/8-bit linear layers when
quantized), trainable parameters' gradients at their dtype, AdamW keeping two states at the
parameter's dtype (fp32 master weights + AMP = the classic 16 bytes/parameter when model.dtype is
float32 and mixed precision is bf16), LoRA adapters in fp32. The activation constants are estimates
for a pre-norm decoder with sdpa attention (no seq^2 term); docs/runs.md compares them with the
seed's VRAM table and, when a GPU is lent, with measured peaks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

GiB = 2**30

# name -> (usable memory GiB, dense bf16/fp16 tensor TFLOP/s from the datasheet)
GPUS: dict[str, tuple[float, float]] = {
    "h200-141gb": (140.0, 989.0), "h100-80gb": (79.6, 989.0), "h100-pcie-80gb": (79.6, 756.0),
    "a100-80gb": (79.2, 312.0), "a100-40gb": (39.4, 312.0), "l40s-48gb": (44.4, 362.0), "a6000-48gb": (47.5, 155.0),
    "l4-24gb": (22.0, 121.0), "a10g-24gb": (22.0, 70.0), "rtx4090-24gb": (23.6, 165.0), "rtx3090-24gb": (23.6, 71.0),
    "v100-32gb": (31.7, 125.0), "v100-16gb": (15.8, 125.0), "t4-16gb": (14.6, 65.0), "mi300x-192gb": (191.5, 1307.0),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer state elements per trainable parameter and their byte width (None = the parameter's dtype).
OPTIMIZERS: dict[str, tuple[float, int | None]] = {
    "adamw": (2, None), "adamw_torch": (2, None), "adamw_fused": (2, None), "adam": (2, None),
    "adamw_8bit": (2, 1), "paged_adamw_8bit": (2, 1), "paged_adamw": (2, None), "lion": (1, None), "lion_8bit": (1, 1),
    "sgd": (1, None), "adagrad": (1, None), "adafactor": (0.05, 4),  # factored second moment: ~rows+cols per matrix
}
ACT_OVERHEAD_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS workspace + allocator slack, measured order of magnitude
ASSUMED_MFU = 0.35  # for the rough time per step


@dataclass
class Shape:
    """What the planner needs to know about a model (all from its config)."""

    params: int  # all parameters
    linear_params: int  # parameters inside nn.Linear layers except the output head (quantized by bitsandbytes)
    lora_dims: list[tuple[int, int]]  # (in, out) of every Linear a LoRA 'all-linear' would adapt
    lora_names: list[str]
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int
    experts_per_token: int = 1  # MoE: experts each token runs through (its MLP activations scale with it)
    params_by_name: dict[str, int] = field(default_factory=dict)  # for train.freeze (layers / name regexes)
    layer_prefix: str = ""  # the decoder layers' ModuleList, e.g. "model.layers"
    largest_matrix: int = 0  # elements of the largest quantizable matrix (one expert's, in an MoE)

    @property
    def embed_like(self) -> int:
        return self.params - self.linear_params


@dataclass
class PlanInput:
    finetune: str = "lora"  # full | lora | freeze
    weight_dtype: str = "bfloat16"
    mixed_precision: str = "bf16"
    quantize: str | None = None  # 4bit | 8bit
    optimizer: str = "adamw"
    lora_r: int = 16
    lora_targets: str | list[str] = "all-linear"
    trainable_fraction: float = 1.0  # freeze: share of parameters left trainable (when no layers/modules are given)
    freeze_layers: int | None = None  # freeze: train.freeze.layers (top N decoder layers train)
    freeze_modules: list[str] = field(default_factory=list)  # freeze: train.freeze.modules (name regexes that train)
    micro_batch_size: int = 4
    seq_len: int = 1024
    gradient_checkpointing: bool = False
    nproc: int = 1
    sharding: str = "none"  # none | zero1 | zero2 | zero3 | fsdp
    offload: bool = False


@dataclass
class Plan:
    parts: dict[str, float]  # bytes per device by component
    trainable: int
    total_params: int
    step_seconds: float | None
    tokens_per_step: int
    inputs: PlanInput
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(self.parts.values())


def shape_from_config(model_config) -> Shape:
    """Count parameters exactly by building the model on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    from tuneforge.model.moe import FUSED, fused_experts

    head = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())
    dims, names, linear = [], [], 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            linear += mod.weight.numel()
            dims.append((mod.in_features, mod.out_features))
            names.append(name)
    # Fused MoE experts are 4-bit under quantize: 4bit (model/moe.py), like the Linear layers; never LoRA targets.
    experts = [getattr(m, p) for _, m in fused_experts(model) for p in FUSED]
    linear += sum(w.numel() for w in experts)
    largest = max([i * o for i, o in dims] + [w[0].numel() for w in experts] + [0])
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(c, "num_attention_heads", 1)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    layer_prefix = next((n for n, m in model.named_modules()
                         if isinstance(m, torch.nn.ModuleList) and len(m) == c.num_hidden_layers), "")
    return Shape(params=params, linear_params=linear, lora_dims=dims, lora_names=names, hidden=c.hidden_size,
                 layers=c.num_hidden_layers, intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size),
                 kv_dim=kv * head_dim, vocab=c.vocab_size, experts_per_token=getattr(c, "num_experts_per_tok", None) or 1,
                 params_by_name={n: p.numel() for n, p in model.named_parameters()}, layer_prefix=layer_prefix,
                 largest_matrix=largest)


def freeze_trainable(shape: Shape, layers: int | None, modules: list[str]) -> int:
    """Parameters a train.freeze run trains: the top `layers` decoder layers and every name matching `modules`
    (the same rule as model/adapters.freeze)."""
    prefixes = tuple(f"{shape.layer_prefix}.{i}." for i in range(shape.layers - (layers or 0), shape.layers)) if layers else ()
    regexes = [re.compile(p) for p in modules]
    return sum(n for name, n in shape.params_by_name.items()
               if (prefixes and name.startswith(prefixes)) or any(r.search(name) for r in regexes))


def lora_params(shape: Shape, r: int, targets) -> int:
    if targets == "all-linear":
        chosen = shape.lora_dims
    else:
        wanted = set(targets)
        chosen = [d for d, n in zip(shape.lora_dims, shape.lora_names) if n.rsplit(".", 1)[-1] in wanted]
    return sum(r * (i + o) for i, o in chosen)


def plan(shape: Shape, x: PlanInput, grad_accum: int = 1, peak_tflops: float | None = None) -> Plan:
    wb = DTYPE_BYTES[x.weight_dtype]
    n = max(1, x.nproc)
    notes = []
    # Weights: quantized linear layers and MoE experts (bnb nf4 ~4.13 bits with double-quant absmax; int8 + scales
    # ~8.06 bits); embeddings, norms and the head at the weights' dtype, or fp32 on a quantized base (peft's k-bit
    # preparation upcasts every parameter it does not quantize).
    dequant = 0.0
    if x.quantize == "4bit":
        weights = shape.linear_params * 4.127 / 8 + shape.embed_like * 4
    elif x.quantize == "8bit":
        weights = shape.linear_params * 8.06 / 8 + shape.embed_like * 4
    else:
        weights = shape.params * wb
    if x.quantize:
        # Each quantized matmul de-quantizes its matrix (forward and again in backward): the largest one at
        # compute precision, plus its cast, is alive at a time.
        dequant = 2.0 * shape.largest_matrix * 2
    if x.finetune == "lora" or x.quantize:
        trainable, tb = lora_params(shape, x.lora_r, x.lora_targets), 4  # peft keeps adapters in fp32
        weights += trainable * tb
    elif x.finetune == "freeze" and (x.freeze_layers or x.freeze_modules):
        trainable, tb = freeze_trainable(shape, x.freeze_layers, x.freeze_modules), wb
    elif x.finetune == "freeze":
        trainable, tb = int(shape.params * x.trainable_fraction), wb
    else:
        trainable, tb = shape.params, wb
    grads = trainable * tb
    states, width = OPTIMIZERS.get(x.optimizer, OPTIMIZERS["adamw"])
    optim = trainable * states * (width or tb)
    # Sharding: ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3/FSDP also weights.
    if x.sharding in ("zero1", "zero2", "zero3", "fsdp"):
        optim /= n
    if x.sharding in ("zero2", "zero3", "fsdp"):
        grads /= n
    if x.sharding in ("zero3", "fsdp"):
        weights = weights / n + _largest_layer(shape) * wb  # one layer gathered at a time
    if x.offload:
        optim = 0.0
        if x.sharding in ("zero3", "fsdp"):
            weights = _largest_layer(shape) * wb * 2
            notes.append("offload: parameters and optimizer state live in CPU RAM")
        else:
            notes.append("offload: optimizer state lives in CPU RAM")
    tokens = x.micro_batch_size * x.seq_len
    parts = {"weights": weights, "gradients": grads, "optimizer": optim,
             "activations": activation_bytes(shape, x, tokens), "logits": tokens * shape.vocab * 10.0,
             "runtime": float(ACT_OVERHEAD_BYTES)}
    if dequant:
        parts["dequantized"] = dequant
    return Plan(parts, trainable, shape.params, step_seconds(shape, x, grad_accum, peak_tflops), tokens, x, notes)


def activation_bytes(shape: Shape, x: PlanInput, tokens: int) -> float:
    """Saved-for-backward tensors. Per layer and token a pre-norm decoder keeps ~12 hidden-size tensors
    (norm in/out, q, attention out, o_proj in, residuals, fp32 norm stats), k/v, and ~4 MLP-width tensors
    (gate, up, act(gate), act*up). With checkpointing only each layer's input stays, plus one layer's set."""
    ab = 2 if x.mixed_precision in ("bf16", "fp16") or x.weight_dtype != "float32" else 4
    per_layer = ab * (12 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate * shape.experts_per_token)
    if x.gradient_checkpointing:
        return tokens * (shape.layers * shape.hidden * ab + per_layer)
    return tokens * shape.layers * per_layer


def _largest_layer(shape: Shape) -> float:
    return shape.params / max(1, shape.layers) if shape.layers else shape.params


def step_seconds(shape: Shape, x: PlanInput, grad_accum: int, peak_tflops: float | None) -> float | None:
    """6·P FLOPs per token for full training, ~4·P with frozen base weights (no weight gradients),
    +2·P with checkpointing (a second forward); at an assumed MFU."""
    if not peak_tflops:
        return None
    per_token = (6 if x.finetune == "full" else 4) * shape.params + (2 * shape.params if x.gradient_checkpointing else 0)
    tokens = x.micro_batch_size * x.seq_len * grad_accum  # per device
    return tokens * per_token / (peak_tflops * 1e12 * ASSUMED_MFU)


def parse_memory(text: str) -> float:
    """'24GiB' / '24g' / '24' -> 24 GiB; '80GB' -> 80e9 bytes; '40000MiB' -> MiB."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if not m:
        from tuneforge.errors import UserError

        raise UserError(f"--memory {text!r}: give a size like 24GiB or 80GB")
    value, unit, binary, b = float(m.group(1)), m.group(2) or "g", m.group(3), m.group(4)
    base = 1000 if (b and not binary) else 1024  # '80GB' is decimal like a datasheet; '24GiB' / '24g' binary
    return value * base ** "_kmgt".index(unit)


def suggestions(shape: Shape, x: PlanInput, budget: float) -> list[tuple[str, Plan]]:
    """Changes that make the run fit, each with its plan, cheapest in quality/speed first."""
    tries: list[tuple[str, PlanInput]] = []
    if not x.gradient_checkpointing:
        tries.append(("train.gradient_checkpointing=true", replace(x, gradient_checkpointing=True)))
    for mbs in (x.micro_batch_size // 2, x.micro_batch_size // 4, 1):
        if 1 <= mbs < x.micro_batch_size:
            tries.append((f"train.micro_batch_size={mbs} (raise train.grad_accum x{x.micro_batch_size // mbs} to keep the batch)"
                          + (" + gradient_checkpointing" if not x.gradient_checkpointing else ""),
                          replace(x, micro_batch_size=mbs, gradient_checkpointing=True)))
    if x.optimizer in ("adamw", "adamw_torch", "adamw_fused", "adam") and x.finetune == "full":
        tries.append(("train.optimizer=adamw_8bit", replace(x, optimizer="adamw_8bit", gradient_checkpointing=True)))
    if x.finetune == "full":
        tries.append(("train.finetune=lora", replace(x, finetune="lora", gradient_checkpointing=True)))
    if x.quantize != "4bit":
        tries.append(("train.finetune=lora + model.quantize=4bit (QLoRA)",
                      replace(x, finetune="lora", quantize="4bit", gradient_checkpointing=True)))
    if x.nproc > 1 and x.sharding not in ("zero3", "fsdp"):
        tries.append(("deepspeed zero3 (shard weights, gradients and optimizer over the processes)",
                      replace(x, sharding="zero3", gradient_checkpointing=True)))
    tries.append(("deepspeed zero3_offload (optimizer and parameters in CPU RAM)",
                  replace(x, sharding="zero3", offload=True, gradient_checkpointing=True)))
    out = []
    for label, alt in tries:
        p = plan(shape, alt)
        if p.peak <= budget:
            out.append((label, p))
    return out[:4]


def inputs_from_config(cfg, nproc: int = 1, assume_gpu: bool = True) -> PlanInput:
    """Read the planner's inputs from a tuneforge Config (keys other issues add are read when present)."""
    t, d, m = cfg.train, cfg.data, cfg.model
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if assume_gpu else "float32")
    mp = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if assume_gpu else "no")
    quantize = getattr(m, "quantize", None) or getattr(t, "quantize", None)
    seq = d.bin_tokens if d.packing == "bins" else (d.block_size if d.group_texts else d.max_length)
    ds = str(getattr(t, "deepspeed", None) or "")
    sharding = "fsdp" if getattr(t, "fsdp", False) else ("zero" + ds[4] if ds.startswith("zero") and len(ds) > 4 else "none")
    return PlanInput(
        finetune=t.finetune if t.finetune in ("full", "lora", "freeze") else "lora", weight_dtype=dtype, mixed_precision=mp,
        quantize=str(quantize) if quantize else None, optimizer=str(getattr(t, "optimizer", "adamw") or "adamw"),
        lora_r=cfg.lora.r, lora_targets=cfg.lora.target_modules, micro_batch_size=t.micro_batch_size, seq_len=seq,
        freeze_layers=t.freeze.layers, freeze_modules=list(t.freeze.modules),
        gradient_checkpointing=t.gradient_checkpointing, nproc=nproc, sharding=sharding, offload="offload" in ds,
    )


def load_model_config(path: str, trust_remote_code: bool = False):
    """The model's config.json only (a local dir, or a hub id: one small file, no weights)."""
    from pathlib import Path

    from transformers import AutoConfig

    from tuneforge.errors import UserError

    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        raise UserError(f"plan: {path} is a GGUF file; point model.path at an HF model directory or hub id to plan")
    try:
        return AutoConfig.from_pretrained(str(p) if p.exists() else path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"plan: cannot read the model config of {path}: {str(exc).splitlines()[0]}") from None


def fmt_gib(b: float) -> str:
    if b < GiB:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / GiB:.2f} GiB" if b < 10 * GiB else f"{b / GiB:.1f} GiB"


def describe(p: Plan) -> str:
    x = p.inputs
    q = f" {x.quantize}" if x.quantize else ""
    return (f"{x.finetune}{q}, {x.weight_dtype} weights, {x.optimizer}, micro-batch {x.micro_batch_size} x {x.seq_len} tokens, "
            f"checkpointing {'on' if x.gradient_checkpointing else 'off'}, {x.nproc} process(es), sharding {x.sharding}"
            + (" + offload" if x.offload else ""))

