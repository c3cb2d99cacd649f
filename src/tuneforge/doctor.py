"""`tuneforge doctor`: what this machine can run, one row per piece, with a hint for each missing one."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def checks() -> list[Check]:
    py_ok = sys.version_info >= (3, 10)
    out = [Check("python", py_ok, platform.python_version(), "" if py_ok else "tuneforge needs Python >= 3.10")]
    tv = _version("torch")
    out.append(Check("torch", tv is not None, tv or "not installed", "" if tv else "pip install torch (pin the CUDA build you need)"))
    if tv is None:
        return out
    out += accelerator_checks()
    for pkg, why in (("flash-attn", "model.attn_implementation=flash_attention_2 (GPU only)"),
                     ("bitsandbytes", "QLoRA (model.quantize 4bit/8bit) and 8-bit optimizers"),
                     ("deepspeed", "ZeRO stages / offload"), ("wandb", "tracking.wandb"), ("mlflow", "tracking.mlflow")):
        v = _version(pkg) or (_version("mlflow-skinny") if pkg == "mlflow" else None)
        out.append(Check(pkg, v is not None, v or "not installed", "" if v else f"pip install {pkg} for {why}"))
    out += disk_checks()
    return out


def accelerator_checks() -> list[Check]:
    import torch

    out = []
    if torch.cuda.is_available():
        kind = "ROCm " + torch.version.hip if getattr(torch.version, "hip", None) else "CUDA " + str(torch.version.cuda)
        out.append(Check("accelerator", True, f"{kind}, {torch.cuda.device_count()} GPU(s)"))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(Check(f"gpu {i}", True, f"{p.name}, {p.total_memory / 2**30:.1f} GiB"))
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Check("bf16", bf16, "supported" if bf16 else "not supported", "" if bf16 else "use train.mixed_precision=fp16"))
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append(Check("accelerator", True, "Apple MPS"))
    else:
        out.append(Check("accelerator", False, "CPU only (" + str(os.cpu_count()) + " cores)",
                         "training runs on CPU (slow); install a CUDA/ROCm torch build on a GPU machine"))
    return out


def disk_checks() -> list[Check]:
    from tuneforge.model.load import tuneforge_home

    out = []
    places = {"working dir": Path.cwd(), "tuneforge home": tuneforge_home(),
              "HF cache": Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))}
    for name, path in places.items():
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 2**30
        out.append(Check(f"disk: {name}", free >= 10, f"{path} ({free:.1f} GiB free)",
                         "" if free >= 10 else "under 10 GiB free: checkpoints of a 7B model need tens of GiB"))
    return out

