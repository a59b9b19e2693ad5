"""FP8 recovery training with torchao's float8, kept through every resize.

``enable_fp8_training: True`` swaps the decoder layers' projections (q/k/v/output_proj, w1/w2/w3)
for torchao ``Float8Linear`` (dynamic per-tensor scaling), which runs their matmuls in float8
on GPUs with FP8 tensor cores (compute capability ≥ 8.9: Ada, Hopper, Blackwell) and keeps the
master weights, the embeddings, the output projection and the norms in the training dtype.

Why it is tied to the build, not applied once: a resize *rebuilds* the model at its new widths
(``resize.py``), so the conversion must happen again on every rebuild, before activation
checkpointing, compile and FSDP2 wrap the modules, as torchao requires. The recipe therefore
builds every model — the first one and each resized one — through :func:`float8_decoder`, a
builder that instantiates the configured model and converts it.

FP8 matmuls need both dimensions of every converted weight to be multiples of 16, which
pruning breaks unless widths are rounded: the recipe requires ``pruning.method.round_to`` to be
a multiple of 16 (the GPU configs use 64) and a projection whose dims are not (e.g. a layer
the pruner left at a non-multiple base width) simply stays in the training dtype.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

import torch
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
MIN_CAPABILITY = (8, 9)


def fp8_problems(device: str, round_to: Optional[int]) -> List[str]:
    """Why ``enable_fp8_training`` cannot run here (empty: it can), before any work."""
    problems = []
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same to the user
        problems.append(
            f"enable_fp8_training=True needs torchao.float8 ({type(e).__name__}: {e}); install torchao 0.14/0.15"
        )
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        problems.append(
            f"enable_fp8_training=True needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9, "
            f"e.g. H100/H200/L40S/RTX 4090); this run's device is {device!r}: set enable_fp8_training=False"
        )
    else:
        capability = torch.cuda.get_device_capability()
        if capability < MIN_CAPABILITY:
            problems.append(
                f"enable_fp8_training=True needs compute capability >= 8.9 for FP8 matmuls; this GPU "
                f"({torch.cuda.get_device_name()}) is {capability[0]}.{capability[1]}: set enable_fp8_training=False"
            )
    if round_to is not None and round_to % 16:
        problems.append(
            f"enable_fp8_training=True needs MLP widths in multiples of 16 (FP8 matmuls): set "
            f"pruning.method.round_to to a multiple of 16 (got {round_to}; the GPU configs use 64)"
        )
    return problems


def is_fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """A decoder layer's projection whose two dimensions are multiples of 16 (torchao's
    ``module_filter_fn(module, fqn)``)."""
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False
    if fqn.rsplit(".", 1)[-1] not in PROJECTIONS:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8_(model: nn.Module) -> nn.Module:
    """Swap eligible projections for ``Float8Linear`` in place (see module doc)."""
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(model, module_filter_fn=is_fp8_eligible)


def float8_decoder(model: Mapping[str, Any]) -> nn.Module:
    """Builder: the model component ``model`` (a config node), converted for FP8 training.

    torchtune hands nested nodes over as plain dicts (``instantiate`` resolves only the outer
    one) and refuses to instantiate anything but a ``DictConfig``: the node is wrapped back.
    """
    from omegaconf import DictConfig, OmegaConf
    from torchtune import config

    node = model if isinstance(model, DictConfig) else OmegaConf.create(dict(model))
    return convert_to_fp8_(config.instantiate(node))


def wrap_component(node: Mapping[str, Any]) -> dict:
    """The config node that builds ``node``'s model through :func:`float8_decoder`."""
    return {"_component_": "adapt_prune_tune.fp8.float8_decoder", "model": dict(node)}
