"""How fast a decoder runs and how much memory it needs, measured on its device.

Three figures a person deciding whether pruning paid off asks for:

* **forward tokens/s**: one batch of ``batch_size × seq_len`` tokens through the model, no
  autograd (scoring, prefill, evaluation);
* **generation tokens/s**: greedy decoding of ``new_tokens`` tokens at batch 1 after a prompt,
  with torchtune's KV cache (``local_kv_cache`` sets up ``setup_caches`` and removes it
  again), one token per forward pass: what a chat user waits on. The prompt's prefill is timed
  separately and not counted;
* **peak memory** of each: the model's weights plus the most memory the measurement added on
  top of what the process already held. On CUDA that is ``max_memory_allocated`` (exact, the
  caching allocator's reserve not counted). On CPU it is the growth of the resident set's high
  water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before each phase); the
  allocator may reuse memory the process already holds, so the growth is a lower bound. Some
  kernels and sandboxes accept the reset and ignore it, so it is checked (the mark must fall
  to the current RSS); where it did not take, a thread samples ``VmRSS`` every millisecond
  instead, which can miss a peak shorter than that. ``memory_measure`` says which.

Speed does not depend on the weights' values, so :func:`speed_record` can compare the
original and the pruned *architectures* with freshly initialized weights: no second copy of
the base checkpoint is read, and under FSDP rank 0 measures whole models, not shards.
"""

from __future__ import annotations

import platform
import re
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch
from torch import nn

Device = Union[str, torch.device]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> Optional[int]:
    match = re.search(rf"{field}:\s+(\d+)\s+kB", _STATUS.read_text()) if _STATUS.exists() else None
    return int(match.group(1)) * 1024 if match else None


# A reset that took leaves the mark at the RSS it read, give or take pages touched in between.
_RESET_SLACK_BYTES = 4 * 2**20


def _reset_vm_hwm() -> bool:
    """Reset the resident high-water mark to the current RSS; whether the reset took."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + _RESET_SLACK_BYTES


class _RssSampler:
    """The largest ``VmRSS`` a background thread saw while running (every ``interval`` s)."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval = interval
        self.peak = _status_bytes("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _status_bytes("VmRSS") or 0)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("VmRSS") or 0)


@contextmanager
def peak_memory_growth(device: torch.device) -> Iterator[Dict[str, Any]]:
    """Measure the most memory the block adds on ``device``, in bytes.

    Yields a dict that holds ``growth_bytes`` and ``measure`` after the block.
    """
    out: Dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["growth_bytes"] = torch.cuda.max_memory_allocated(device) - start
        out["measure"] = "cuda max_memory_allocated"
        return
    if _reset_vm_hwm():
        start = _status_bytes("VmHWM")
        yield out
        out["growth_bytes"] = _status_bytes("VmHWM") - start
        out["measure"] = "cpu VmHWM growth (lower bound)"
        return
    start = _status_bytes("VmRSS")
    if start is not None:
        with _RssSampler() as sampler:
            yield out
        out["growth_bytes"] = max(0, sampler.peak - start)
        out["measure"] = "cpu VmRSS sampled every 1 ms (lower bound)"
        return
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB elsewhere
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    yield out
    out["growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - start
    out["measure"] = "cpu ru_maxrss growth (lower bound: only new process-wide peaks)"


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once)."""
    seen = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Timed runs
# --------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(output: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
    # torchtune decoders return a list of sequence chunks when chunked output is enabled.
    return torch.cat(output, dim=1) if isinstance(output, list) else output


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _random_tokens(vocab_size: int, shape: tuple, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(vocab_size, shape, generator=generator).to(device)


def _vocab_size(model: nn.Module) -> int:
    return model.tok_embeddings.num_embeddings


def measure_throughput(
    model: nn.Module, vocab_size: int, seq_len: int = 256, batch_size: int = 4, steps: int = 3
) -> float:
    """Forward-pass throughput in tokens per second (no autograd, eval mode).

    One untimed warm-up pass absorbs lazy initialization (CUDA context, kernels, RoPE
    caches); then ``steps`` passes over fixed random tokens are timed, synchronizing the
    device so that queued GPU work is counted. The model's training mode is restored.

    Args:
        model (nn.Module): a decoder taking ``[batch, seq]`` token ids.
        vocab_size (int): token ids are drawn below this.
        seq_len (int): tokens per sequence. Default 256.
        batch_size (int): sequences per pass. Default 4.
        steps (int): timed passes. Default 3.

    Returns:
        float: tokens per second.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    device = next(model.parameters()).device
    tokens = _random_tokens(vocab_size, (batch_size, seq_len), device)
    with _inference(model):
        model(tokens)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(tokens)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    return batch_size * seq_len * steps / elapsed


def greedy_decode_timed(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int
) -> Dict[str, float]:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt`` (``[1, P]``) with a KV cache.

    The prompt goes through in one pass (prefill), then one token per pass, each attending to
    the cache through a causal mask over the cache's length. Stop tokens are ignored: the
    point is a fixed amount of work.

    Returns:
        Dict[str, float]: ``prefill_seconds``, ``decode_seconds`` (the ``new_tokens - 1``
        single-token passes after the prefill produced the first token) and ``tokens``, the
        generated ids (for tests).
    """
    from torchtune.modules.common_utils import local_kv_cache

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (one prefill, one decode step), got {new_tokens}")
    device = prompt.device
    batch, prompt_len = prompt.shape
    total = prompt_len + new_tokens
    dtype = next(model.parameters()).dtype
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))[None]
    positions = torch.arange(total, device=device)[None]
    generated = []
    with local_kv_cache(model, batch_size=batch, device=device, dtype=dtype, decoder_max_seq_len=total):
        _synchronize(device)
        t0 = time.perf_counter()
        logits = _logits(model(prompt, mask=causal[:, :prompt_len], input_pos=positions[:, :prompt_len]))
        token = logits[:, -1].argmax(-1, keepdim=True)
        _synchronize(device)
        t1 = time.perf_counter()
        generated.append(token)
        for pos in range(prompt_len, total - 1):
            logits = _logits(model(token, mask=causal[:, pos : pos + 1], input_pos=positions[:, pos : pos + 1]))
            token = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
        _synchronize(device)
        t2 = time.perf_counter()
    return {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "tokens": torch.cat(generated, 1)}


def describe_device(device: Device) -> str:
    """The device in words: GPU name, or CPU model and intra-op threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        name = match.group(1).strip() if match else name
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def measure_speed(
    model: nn.Module,
    seq_len: int = 512,
    batch_size: int = 4,
    new_tokens: int = 128,
    device: Optional[Device] = None,
    *,
    prompt_len: int = 32,
    steps: int = 3,
) -> Dict[str, Any]:
    """Forward and generation speed and peak memory of a torchtune decoder on its device.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` without KV caches set up (not
            FSDP-sharded: a sharded forward measures communication too; see
            :func:`speed_record`).
        seq_len (int): tokens per sequence of the forward batch. Default 512.
        batch_size (int): sequences of the forward batch (the training batch is a good
            choice). Default 4.
        new_tokens (int): tokens generated greedily at batch 1. Default 128.
        device (Optional[Device]): where to run; the model is moved there. Default: where
            its parameters are.
        prompt_len (int): random prompt tokens before generation. Default 32.
        steps (int): timed forward passes (after one warm-up). Default 3.

    Returns:
        Dict[str, Any]: ``forward_tokens_per_second``, ``generate_tokens_per_second``,
        ``prefill_seconds``, ``forward_peak_memory_bytes``, ``generate_peak_memory_bytes``
        (weights included), ``weights_bytes``, ``memory_measure``, ``device``, ``dtype`` and
        the settings (``seq_len``, ``batch_size``, ``new_tokens``, ``prompt_len``).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if seq_len > model.max_seq_len or prompt_len + new_tokens > model.max_seq_len:
        raise ValueError(
            f"seq_len {seq_len} / prompt_len + new_tokens {prompt_len + new_tokens} exceed the "
            f"model's max_seq_len {model.max_seq_len}"
        )
    vocab_size = _vocab_size(model)
    weights = weights_bytes(model)

    with peak_memory_growth(device) as forward_memory:
        forward = measure_throughput(model, vocab_size, seq_len=seq_len, batch_size=batch_size, steps=steps)

    prompt = _random_tokens(vocab_size, (1, prompt_len), device)
    with _inference(model):
        # Warm-up of the same length: a shorter one leaves the timed run's cache and mask
        # sizes cold (on an H200 the first model measured decoded at 17.5 tokens/s, the second,
        # of the same depth and heads, at 27.6; cold kernels are the likely cause, not verified).
        greedy_decode_timed(model, prompt, new_tokens)
        with peak_memory_growth(device) as generate_memory:
            timed = greedy_decode_timed(model, prompt, new_tokens)
    return {
        "forward_tokens_per_second": forward,
        "generate_tokens_per_second": (new_tokens - 1) / timed["decode_seconds"],
        "prefill_seconds": timed["prefill_seconds"],
        "forward_peak_memory_bytes": weights + forward_memory["growth_bytes"],
        "generate_peak_memory_bytes": weights + generate_memory["growth_bytes"],
        "weights_bytes": weights,
        "memory_measure": forward_memory["measure"],
        "device": describe_device(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "prompt_len": prompt_len,
    }


_TIMES = ("forward_tokens_per_second", "generate_tokens_per_second", "prefill_seconds")


def speed_record(
    models: Mapping[str, Union[nn.Module, Callable[[], nn.Module]]],
    seq_len: int = 512,
    batch_size: int = 4,
    new_tokens: int = 128,
    device: Optional[Device] = None,
    *,
    repeats: int = 1,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Measure several models alike, for a run record's ``speed`` entry.

    Each model is measured ``repeats`` times, the models taking turns, and every speed is the
    median of its repeats (a shared machine's load then affects all models alike); memory is
    the largest of the repeats.

    Args:
        models: label (``"original"``, ``"pruned"``) to model, or to a function building it
            (built once, before the first measurement; e.g. ``lambda: decoder_from_arch(arch)``).
        seq_len, batch_size, new_tokens, device, kwargs: see :func:`measure_speed`.
        repeats (int): measurements per model. Default 1.

    Returns:
        Dict[str, Any]: ``{label: measure_speed(...), ..., "device": str}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    built = {label: model if isinstance(model, nn.Module) else model() for label, model in models.items()}
    runs: Dict[str, List[Dict[str, Any]]] = {label: [] for label in built}
    for _ in range(repeats):
        for label, model in built.items():
            runs[label].append(measure_speed(model, seq_len, batch_size, new_tokens, device, **kwargs))
    record: Dict[str, Any] = {}
    for label, results in runs.items():
        merged = dict(results[0])
        for key in _TIMES:
            merged[key] = statistics.median(r[key] for r in results)
        for key in ("forward_peak_memory_bytes", "generate_peak_memory_bytes"):
            merged[key] = max(r[key] for r in results)
        merged["repeats"] = repeats
        record[label] = merged
    record["device"] = next(iter(record.values()))["device"] if record else describe_device(device or "cpu")
    return record


def arch_speed_record(
    archs: Mapping[str, Any],
    seq_len: int = 512,
    batch_size: int = 4,
    new_tokens: int = 128,
    device: Device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> Dict[str, Any]:
    """:func:`speed_record` of architectures (``DecoderArch`` or its dict), each built with
    fresh weights directly on ``device`` in ``dtype``, as the recipe builds its model (speed
    does not depend on the values; no full-precision copy is ever made)."""
    from torchtune import training

    from adapt_prune_tune.models import decoder_from_arch

    def builder(arch: Any) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            with training.set_default_dtype(dtype), torch.device(device):
                return decoder_from_arch(arch)

        return build

    return speed_record(
        {label: builder(arch) for label, arch in archs.items()},
        seq_len, batch_size, new_tokens, device, **kwargs,
    )
