"""Optimizers by name build and step; every schedule's lr curve is its formula; unknown names are config errors."""

import math

import pytest
import torch

from tuneforge.config.schema import TrainConfig
from tuneforge.train.core.optim import OPTIMIZERS, build_optimizer, build_scheduler, param_groups
from tuneforge.train.core.schedule import lr_lambda


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.lin(x))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_builds_and_steps(name):
    if name in ("adamw_8bit", "paged_adamw_8bit", "lion", "lion_8bit"):
        pytest.importorskip("bitsandbytes")
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-2, weight_decay=0.1))
    for _ in range(2):
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), name
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


def test_weight_decay_skips_biases_and_norms():
    m = Tiny()
    groups = param_groups(m, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(m.lin.weight)}
    assert sum(len(g["params"]) for g in groups) == 4


def test_unknown_optimizer_or_schedule_is_a_config_error_listing_valid_names():
    with pytest.raises(ValueError, match="'adamw', 'adamw_8bit'.*'adagrad'"):
        TrainConfig(optimizer="adamx")
    with pytest.raises(ValueError, match="cosine_with_min_lr"):
        TrainConfig(lr_scheduler="cosine_min")
    with pytest.raises(ValueError, match="constant has no warmup"):
        TrainConfig(lr_scheduler="constant", warmup_steps=3)
    with pytest.raises(ValueError, match="min_lr_ratio applies to"):
        TrainConfig(lr_scheduler="cosine", min_lr_ratio=0.2)


def lrs(kind, total=20, warmup=0, ratio=0.0, peak=1.0, **extra):
    t = TrainConfig(lr=peak, lr_scheduler=kind, max_steps=total, **({"warmup_steps": warmup} if warmup else {}), **extra)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, t, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "cosine_with_min_lr", "linear", "constant", "constant_with_warmup"])
def test_schedule_curve_matches_its_formula(kind):
    total, warm, m, peak = 20, 0 if kind == "constant" else 4, 0.1, 3e-4
    extra = {"min_lr_ratio": m} if kind == "cosine_with_min_lr" else {}
    got = lrs(kind, total, warm, peak=peak, **extra)
    for s, lr in enumerate(got):
        if s < warm:
            want = (s + 1) / (warm + 1)
        else:
            p = (s - warm) / (total - warm)
            cos = 0.5 * (1 + math.cos(math.pi * p))
            want = {"cosine": cos, "cosine_with_min_lr": m + (1 - m) * cos, "linear": 1 - p,
                    "constant": 1.0, "constant_with_warmup": 1.0}[kind]
        assert lr == pytest.approx(peak * want, rel=1e-9, abs=1e-15), (kind, s)
    if kind != "constant":
        assert got[warm] == pytest.approx(peak)  # warmup reaches the peak exactly when it ends
    if kind == "cosine_with_min_lr":
        assert min(got[warm:]) >= peak * m


def test_warmup_ratio_and_unknown_schedule():
    got = lrs("linear", total=10, ratio=0.0, warmup_ratio=0.2)
    assert got[:2] == pytest.approx([1 / 3, 2 / 3]) and got[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="valid: cosine"):
        lr_lambda("exp", 0, 10)
