"""Mixture-of-experts weights in 4 bits.

transformers 5 stores an MoE layer's experts fused, as 3-D parameters (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]) inside one `@use_experts_implementation` module. bitsandbytes quantizes by
replacing `nn.Linear` layers, so under `quantize: 4bit` those experts - most of an MoE's weights (95% of
Mixtral-8x7B) - would stay at full precision. `quantize_fused_experts` replaces each such module with
`Experts4bit`: one bitsandbytes NF4/FP4 matrix per expert (the same block quantization as `Linear4bit`),
run through `bnb.matmul_4bit`, whose backward de-quantizes again instead of keeping the weights.

The experts are frozen, and they are no LoRA target (not `nn.Linear`): an adapter trained on the 4-bit
base has the same keys as one trained on the full-precision base.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.errors import UserError

FUSED = ("gate_up_proj", "down_proj")


def fused_experts(model) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module that keeps its weights as 3-D parameters."""
    return [(name, m) for name, m in model.named_modules()
            if all(isinstance(getattr(m, p, None), nn.Parameter) and getattr(m, p).dim() == 3 for p in FUSED)]


def check_layout(name: str, experts: nn.Module) -> None:
    """Experts4bit runs the standard layout (concatenated gate|up, [out, in] matrices, no bias, SwiGLU-style
    gate): Mixtral, Qwen2/3-MoE, OLMoE, ... Any other layout is refused rather than left at full precision."""
    from transformers.integrations.moe import _default_apply_gate

    odd = [flag for flag, bad in (("transposed weights", getattr(experts, "is_transposed", False)),
                                  ("expert biases", getattr(experts, "has_bias", False)),
                                  ("no gate projection", not getattr(experts, "has_gate", True)),
                                  ("interleaved gate/up", not getattr(experts, "is_concatenated", True)),
                                  ("a post-expert norm", getattr(experts, "has_post_expert_norm", False)),
                                  ("its own gate function", getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate))
           if bad]
    if odd:
        raise UserError(f"model.quantize: 4bit: the experts of this MoE ({type(experts).__name__} at {name}) use {', '.join(odd)}, "
                        "which tuneforge cannot store in 4 bits; they would stay at full precision (train without quantize, or with LoRA on a bf16 base)")


class Experts4bit(nn.Module):
    """A fused experts module with each expert's matrices stored as bitsandbytes 4-bit blocks."""

    def __init__(self, experts: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype, device=None):
        super().__init__()
        import bitsandbytes as bnb

        self.num_experts = experts.gate_up_proj.shape[0]
        self.act_fn = experts.act_fn
        self.compute_dtype = compute_dtype
        device = torch.device(device) if device is not None else experts.gate_up_proj.device
        for pname in FUSED:
            full = getattr(experts, pname).data
            # One quantized matrix per expert (block constants never straddle two experts), quantized on
            # `device` one expert at a time: the full-precision copy is never moved there whole.
            quantized = [bnb.nn.Params4bit(full[e].contiguous(), requires_grad=False, quant_type=quant_type,
                                           compress_statistics=double_quant, blocksize=64).to(device)
                         for e in range(self.num_experts)]
            setattr(self, pname, nn.ParameterList(quantized))

    def dequantized(self, pname: str) -> torch.Tensor:
        """The [E, out, in] weights as training saw them (for merging an adapter into a full-precision base)."""
        import bitsandbytes.functional as F

        return torch.stack([F.dequantize_4bit(p.data, p.quant_state) for p in getattr(self, pname)])

    def _linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, weight.t(), quant_state=weight.quant_state)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # transformers' eager experts loop (integrations/moe.py), with each matmul on the 4-bit weights.
        out = torch.zeros_like(hidden_states)
        x_all = hidden_states.to(self.compute_dtype)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, token = torch.where(mask[e])
            gate, up = self._linear(x_all[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = self._linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, (h * top_k_weights[token, pos, None]).to(out.dtype))
        return out


def quantize_fused_experts(model, quant_type: str, double_quant: bool, compute_dtype: torch.dtype, device=None) -> int:
    """Replace every fused experts module with Experts4bit (on `device`, default: where it is). -> modules replaced."""
    found = fused_experts(model)
    for name, experts in found:
        check_layout(name, experts)
    count = len(found)
    while found:
        name, experts = found.pop(0)  # no reference kept: each full-precision copy is freed once replaced
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Experts4bit(experts, quant_type, double_quant, compute_dtype, device))
    return count


def dequantized_experts(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """{parameter name without `prefix`: fp32 [E, out, in] weights} of every Experts4bit, as training saw them
    (merging an adapter into a full-precision base gives that base these weights)."""
    return {f"{name.removeprefix(prefix)}.{p}": m.dequantized(p).float()
            for name, m in model.named_modules() if isinstance(m, Experts4bit) for p in FUSED}
