"""Where a worker computes, and in what precision.

Pool and evaluation actors get GPUs through ``ray.gpus_per_actor`` (Ray then sets
CUDA_VISIBLE_DEVICES for them, and an actor given none sees no CUDA device); Ray Train
workers through ``ray.use_gpu``. Everything is stored and exchanged as CPU uint8 arrays.
"""

from __future__ import annotations

import contextlib

import torch


def actor_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_autocast(enabled: bool, device: torch.device):
    """bfloat16 autocast of forward passes (parameters, gradients and images stay float32)."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
