"""Optimizer moments as plain float tensors, and back into the optimizer's own representation.

A resize slices every moment to the kept channels and a checkpoint stores them; both are
easy for ``torch.optim.AdamW``, whose moments are float tensors shaped like their parameter
(DTensors under FSDP2). torchao's low-bit optimizers (``AdamW8bit``, ``AdamW4bit``,
``AdamWFp8``) keep each moment as a block-quantized tensor subclass (``OptimState8bit``: uint8
codes plus one scale per block of ``block_size`` elements of the *local* shard), which cannot be
indexed by channel: a kept row's codes are only meaningful with its block's scale, and blocks
move when rows are removed. So every moment goes through one dense form:

* :func:`dense_moment` dequantizes (a no-op for float state), keeping the DTensor placement;
* :func:`new_moment` makes the optimizer's own buffer for the new parameter — torchao's
  ``_new_buffer``, which picks quantized or float state by the same rule as its ``step`` (local
  size ≥ 4096 and divisible by ``block_size``) — and fills it from the dense values, which
  re-quantizes with the optimizer's block size.

Dequantize → slice → re-quantize loses only what a fresh quantization of the sliced values
loses. Without slicing the round trip is exact: each block's absmax element dequantizes to
±scale exactly, so re-quantizing finds the same scale and the same codes (tested).
"""

from __future__ import annotations

from typing import Any

import torch

# Signedness of torchao's Adam-family moments (``_AdamBase.step``): the first moment is
# signed, the second moments are not.
_UNSIGNED_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "device_mesh") else t


def is_quantized(t: Any) -> bool:
    """A torchao low-bit optimizer state (plain or inside a DTensor)."""
    return isinstance(t, torch.Tensor) and hasattr(_local(t), "dequantize") and hasattr(_local(t), "codes")


def dense_moment(value: torch.Tensor) -> torch.Tensor:
    """The moment as float values, placed like ``value`` (sharded DTensor or plain)."""
    local = _local(value)
    if not hasattr(local, "codes"):
        return value
    dense = local.dequantize(torch.float32)
    if hasattr(value, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            dense, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
        )
    return dense


def uses_quantized_state(optimizer: torch.optim.Optimizer) -> bool:
    """torchao low-bit optimizers build their state with ``_new_buffer``."""
    return hasattr(optimizer, "_new_buffer") and hasattr(optimizer, "block_size")


def new_moment(optimizer: torch.optim.Optimizer, param: torch.Tensor, key: str, full: torch.Tensor) -> torch.Tensor:
    """State ``key`` of ``param`` holding the float values ``full``.

    ``full`` is the whole (unsharded) tensor, or a DTensor already placed like ``param`` (a cut
    that kept each rank's rows). Placed like ``param``; quantized with the optimizer's block size
    when the optimizer keeps quantized state for a parameter of this size (torchao's own rule,
    via ``_new_buffer``).
    """
    from adapt_prune_tune.resize import like

    if not uses_quantized_state(optimizer):
        return like(full, param)
    buffer = optimizer._new_buffer(param, key not in _UNSIGNED_MOMENTS)
    # The quantizer reads fp32: a bf16 detour would round the moments before quantizing them.
    _local(buffer).copy_(_local(like(full, param.detach(), dtype=torch.float32)))
    return buffer


# torchao's optimizer-state subclasses a checkpoint may rebuild, by class name: an allowlist, so
# that a checkpoint's metadata can only ever name one of these, never an arbitrary class.
def _quantized_classes() -> dict:
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    return {cls.__name__: cls for cls in (OptimState8bit, OptimState4bit, OptimStateFp8)}


def flatten_quantized(local: torch.Tensor) -> tuple:
    """``(class name, context, {attribute: tensor})`` of a local low-bit state: its exact parts."""
    attrs, ctx = local.__tensor_flatten__()
    return type(local).__name__, list(ctx), {a: getattr(local, a) for a in attrs}


def unflatten_quantized(class_name: str, ctx: list, attrs: dict) -> torch.Tensor:
    """Rebuild a low-bit state from :func:`flatten_quantized` parts (allowlisted classes only)."""
    classes = _quantized_classes()
    if class_name not in classes:
        raise ValueError(f"unknown optimizer state class {class_name!r} (known: {sorted(classes)})")
    cls = classes[class_name]
    ctx = [torch.Size(c) if isinstance(c, (list, tuple)) else c for c in ctx]
    return cls.__tensor_unflatten__(attrs, ctx, None, None)


def wrap_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A rank-local state tensor placed like ``param`` (a DTensor around it under FSDP2)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        ).to(param.device)
    return local
