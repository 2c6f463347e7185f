"""How training computes on its device: the mixed-precision default and the CUDA kernel settings.

`train.py` and the throughput profiler use the same ones, so the profiler's model stages run the step
the way training does.
"""

from __future__ import annotations

import contextlib
import os

import torch

MIXED_PRECISION = ("no", "bf16", "fp16")


def default_mixed_precision() -> str:
    """The launcher's choice (`accelerate launch --mixed_precision`) unless it is "no"; otherwise bf16
    autocast on a CUDA GPU that supports it (Ampere and later), float32 elsewhere."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def use_fast_cuda_kernels(tf32: bool = True) -> None:
    """TF32 for float32 matmuls and convolutions, cuDNN autotuning (input shapes are fixed per crop size)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, mixed_precision: str):
    """The autocast context of `mixed_precision` ("no": none) on `device`, as Accelerate sets it up."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
