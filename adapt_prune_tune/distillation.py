"""Knowledge distillation from the unpruned model, inside every stage of Adapt-Accel.

Recovery training after a cut re-learns from next-token labels alone. The model before any
cut knows a whole distribution per token, and matching it (Hinton et al.; NVIDIA's Minitron
for pruned LLMs) recovers more per token than the labels do. Here the teacher is the base
checkpoint, frozen and never resized, and the training loss of every stage becomes

    L = (1 - α) · CE(student, labels) + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

averaged over the tokens that have a label, like torchtune's chunked cross-entropy.

Memory. torchtune's ``ForwardKLWithChunkedOutputLoss`` takes the teacher's logits for the
whole sequence (``[B, S, V]``; 1 GB in bf16 for Llama-3.1's vocabulary at 4 × 1024 tokens)
and autograd then keeps fp32 probabilities of both models for every chunk until backward.
Instead, the teacher's forward stops at its final hidden state (``[B, S, D]``, ~30× smaller)
and its output projection runs one sequence chunk at a time, aligned with the student's
output chunks. For each chunk the loss *and its gradient with respect to the student's
logits* are computed in closed form,

    ∂L/∂z_s = (1 - α) · (softmax(z_s) - onehot(y)) + α · T · (softmax(z_s / T) - softmax(z_t / T)),

and only that gradient, in the student's logits dtype, is kept for backward — one tensor
the size of the student's logits, less than cross-entropy alone keeps through autograd.
The math is checked against torchtune's ``CEWithChunkedOutputLoss`` and ``ForwardKLLoss``
in the tests.

Why the teacher's head runs *inside* the teacher's forward (a replaced ``unembed``): under
FSDP2 the output projection's weight is only unsharded during the root module's forward; a
call from outside would meet sharded parameters. The whole teacher pass runs under
``no_grad``, so FSDP never schedules a backward for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CALIBRATION_LOSSES = ("ce", "kl")


@dataclass(frozen=True)
class DistillConfig:
    """The ``distill:`` section of a recipe config.

    Attributes:
        enabled (bool): distil from the base checkpoint during every stage's training.
        alpha (float): weight of the KL term; 0 is plain cross-entropy, 1 is pure distillation.
        temperature (float): T, softening both distributions; the KL term is scaled by T² so
            its gradient keeps the cross-entropy's scale (Hinton et al.).
        calibration_loss (str): loss whose gradients give the Taylor scores when pruning:
            ``ce`` (next-token cross-entropy, the paper's) or ``kl`` (KL to the teacher: a
            group matters as much as removing it moves the model away from the original).
    """

    enabled: bool = False
    alpha: float = 0.5
    temperature: float = 1.0
    calibration_loss: str = "ce"

    def __post_init__(self) -> None:
        # Types, ranges and rules live in the config table (which takes its defaults from here).
        from adapt_prune_tune.config_schema import DISTILL

        problems = DISTILL.problems(asdict(self))
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_section(cls, section: Optional[Mapping[str, Any]]) -> "DistillConfig":
        """From the config's ``distill:`` mapping (None or absent: disabled).

        Keys that are not settings of the section are refused with the closest valid name;
        ``teacher_model`` / ``teacher_checkpointer`` are components the recipe reads itself.
        """
        from adapt_prune_tune.config_schema import DISTILL

        section = dict(section or {})
        problems = DISTILL.problems(section)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})


# --------------------------------------------------------------------------- the math


@dataclass
class ChunkLoss:
    """Summed (not averaged) loss terms of one chunk, and the loss's gradient w.r.t. its logits."""

    loss: torch.Tensor  # (1 - α)·CE + α·T²·KL, summed over labelled tokens
    ce: torch.Tensor  # student cross-entropy, summed
    kl: torch.Tensor  # KL(teacher_T ‖ student_T), summed (without the T² factor)
    teacher_ce: torch.Tensor  # the teacher's own cross-entropy on the same labels, summed
    count: torch.Tensor  # labelled tokens
    grad: torch.Tensor  # ∂loss/∂student_logits, in the student's dtype


@torch.no_grad()
def chunk_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    ignore_index: int = -100,
    grad_scale: Union[float, torch.Tensor] = 1.0,
) -> ChunkLoss:
    """Loss terms and closed-form gradient for ``[N, V]`` logits of both models and ``[N]`` labels.

    Everything is computed in fp32 and one chunk at a time; tokens whose label is
    ``ignore_index`` contribute nothing (their gradient rows are zero). The gradient is
    multiplied by ``grad_scale`` (e.g. 1 / tokens of the batch) before it is cast to the
    student's dtype, so a bf16 gradient keeps its precision.
    """
    mask = labels != ignore_index
    maskf = mask.unsqueeze(-1).float()
    target = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    s = student.float()
    logp_s = F.log_softmax(s, dim=-1)
    ce = -(logp_s.gather(-1, target) * maskf).sum()
    logp_t = F.log_softmax(teacher.float(), dim=-1)
    teacher_ce = -(logp_t.gather(-1, target) * maskf).sum()
    if temperature != 1.0:
        logp_t = F.log_softmax(teacher.float() / temperature, dim=-1)
        logp_sT = F.log_softmax(s / temperature, dim=-1)
    else:
        logp_sT = logp_s
    del s
    p_t = logp_t.exp()
    kl = ((p_t * (logp_t - logp_sT)).sum(-1, keepdim=True) * maskf).sum()
    del logp_t
    # (1-α)(p_s - onehot) + α·T·(p_s^T - p_t^T), masked rows zero. The distillation term is
    # formed first: at T = 1 logp_sT *is* logp_s, which the next line overwrites in place.
    distill_grad = logp_sT.exp().sub_(p_t).mul_(alpha * temperature) if alpha else None
    del p_t, logp_sT
    grad = logp_s.exp_().mul_(1.0 - alpha)
    grad.scatter_add_(-1, target, torch.full(target.shape, -(1.0 - alpha), device=grad.device))
    if distill_grad is not None:
        grad.add_(distill_grad)
    grad.mul_(maskf * grad_scale)
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return ChunkLoss(loss, ce, kl, teacher_ce, mask.sum(), grad.to(student.dtype))


class _LossWithKnownGradient(torch.autograd.Function):
    """A scalar whose gradient w.r.t. each input chunk was computed in the forward pass.

    The chunks themselves are not saved: only the precomputed gradients are, one per chunk.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: Sequence[torch.Tensor], *chunks: torch.Tensor) -> torch.Tensor:
        ctx.grads = list(grads)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grads = ctx.grads
        ctx.grads = None
        return (None, None, *[g * grad_out.to(g.dtype) for g in grads])


def loss_with_gradient(value: torch.Tensor, grads: Sequence[torch.Tensor], chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``value`` as a differentiable function of ``chunks`` with ``∂value/∂chunks[i] = grads[i]``."""
    return _LossWithKnownGradient.apply(value, list(grads), *chunks)


# --------------------------------------------------------------------------- the teacher


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def own_storage_(model: nn.Module, other: nn.Module) -> int:
    """Give ``model`` its own copy of every parameter whose storage it shares with ``other``.

    Loading two models from one state dict without sharding (one process) makes both alias
    the same tensors, so training the student would silently train the teacher too. Returns
    how many parameters were copied.
    """
    taken = {_local(p).untyped_storage().data_ptr() for p in other.parameters()}
    copied = 0
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if _local(param).untyped_storage().data_ptr() in taken:
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
                copied += 1
    return copied


class Teacher:
    """The frozen base model and the distillation pass that runs through it.

    ``watch(student)`` records the student's forward inputs (token ids, mask, positions: a few
    KB) with a forward pre-hook; :meth:`distill` then runs the teacher on the same inputs and
    returns the summed loss terms of the student's logits, one output chunk at a time.
    """

    def __init__(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self._inputs: Optional[Tuple[torch.Tensor, Dict[str, Any]]] = None
        self._request: Optional[Callable[[torch.Tensor], Any]] = None
        # The replaced unembed: final norm, then whatever the current request does with the
        # normalized hidden state (the head is applied chunk by chunk inside the request).
        model.unembed = self._unembed  # type: ignore[method-assign]

    def _unembed(self, h: torch.Tensor) -> Any:
        if self._request is None:
            raise RuntimeError("The distillation teacher is only called through Teacher.distill/forward_chunks")
        return self._request(self.model.norm(h))

    def head(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """The teacher's output projection (inside its forward: parameters are unsharded)."""
        return self.model.output(hidden_chunk)

    def watch(self, student: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Record the inputs of every student forward (re-register after the student is rebuilt)."""

        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            tokens = args[0] if args else kwargs["tokens"]
            self.set_inputs(tokens, **{k: kwargs[k] for k in ("mask", "input_pos") if kwargs.get(k) is not None})

        return student.register_forward_pre_hook(hook, with_kwargs=True)

    def set_inputs(self, tokens: torch.Tensor, **extra: Any) -> None:
        """The inputs the next :meth:`distill` runs the teacher on (what the student saw)."""
        self._inputs = (tokens, extra)

    def _run(self, request: Callable[[torch.Tensor], Any], tokens: torch.Tensor, extra: Dict[str, Any]) -> Any:
        self._request = request
        try:
            with torch.no_grad():
                return self.model(tokens, **extra)
        finally:
            self._request = None

    def last_inputs(self) -> Tuple[torch.Tensor, Dict[str, Any]]:
        if self._inputs is None:
            raise RuntimeError("No student forward was recorded: call Teacher.watch(student) first")
        inputs, self._inputs = self._inputs, None
        return inputs

    def distill(
        self,
        student_chunks: Sequence[torch.Tensor],
        labels: torch.Tensor,
        alpha: float,
        temperature: float,
        ignore_index: int = -100,
        grad_scale: Union[float, torch.Tensor] = 1.0,
    ) -> List[ChunkLoss]:
        """Loss terms of the student's ``[B, s_i, V]`` logit chunks against the teacher.

        ``labels`` is ``[B, S]`` (already shifted), split like the chunks. Runs on the inputs
        of the student's last forward. Each chunk's gradient is multiplied by ``grad_scale``.
        """
        tokens, extra = self.last_inputs()
        sizes = [c.size(1) for c in student_chunks]
        if sum(sizes) != tokens.size(1):
            raise ValueError(f"Student logits cover {sum(sizes)} positions, the inputs {tokens.size(1)}")
        label_chunks = labels.split(sizes, dim=1)

        def request(hidden: torch.Tensor) -> List[ChunkLoss]:
            out = []
            for h, s, y in zip(hidden.split(sizes, dim=1), student_chunks, label_chunks):
                t = self.head(h)
                out.append(
                    chunk_distillation_loss(
                        s.detach().reshape(-1, s.size(-1)), t.reshape(-1, t.size(-1)), y.reshape(-1),
                        alpha, temperature, ignore_index, grad_scale,
                    )
                )
                del t
            return out

        return self._run(request, tokens, extra)

    def pending_batch_size(self) -> int:
        """Batch size of the student forward the next :meth:`distill` call will use."""
        if self._inputs is None:
            raise RuntimeError("No student forward was recorded: call Teacher.watch(student) first")
        return self._inputs[0].size(0)


def _as_chunks(logits: Union[torch.Tensor, List[torch.Tensor]], labels: torch.Tensor, batch: int):
    """The stock loop flattens unchunked logits to ``[B·S, V]`` and labels to ``[B·S]``."""
    if isinstance(logits, list):
        return logits, labels
    return [logits.view(batch, -1, logits.size(-1))], labels.view(batch, -1)


class DistillationLoss(nn.Module):
    """Drop-in for the stock loop's ``CEWithChunkedOutputLoss``: ``loss(logits, labels)``.

    Returns the mean over labelled tokens of ``(1 - α)·CE + α·T²·KL`` (the stock loop
    multiplies by the token count, exactly as for cross-entropy) and keeps, summed across
    ranks, the parts of every micro-batch for logging (:meth:`pop_stats`).
    """

    # A micro-batch without label tokens averages over max(count, 1): zero loss, zero gradient.
    finite_without_labels = True

    def __init__(
        self,
        teacher: Teacher,
        alpha: float,
        temperature: float,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self._stats: Optional[torch.Tensor] = None  # ce, kl, teacher_ce, count (summed)

    def forward(self, logits: Union[torch.Tensor, List[torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
        chunks, labels = _as_chunks(logits, labels, self.teacher.pending_batch_size())
        count = (labels != self.ignore_index).sum().clamp(min=1).float()
        parts = self.teacher.distill(chunks, labels, self.alpha, self.temperature, self.ignore_index, 1.0 / count)
        total = torch.stack([p.loss for p in parts]).sum()
        stats = torch.stack([torch.stack([p.ce, p.kl, p.teacher_ce, p.count.float()]) for p in parts]).sum(0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)  # four numbers per micro-batch, for the logged figures
        stats = stats.double()
        self._stats = stats if self._stats is None else self._stats + stats
        return loss_with_gradient(total / count, [p.grad.view_as(c) for p, c in zip(parts, chunks)], chunks)

    def pop_stats(self) -> Dict[str, float]:
        """Token-averaged ``ce_loss``, ``kd_loss`` (KL at T) and ``teacher_ce_loss`` since the last call."""
        if self._stats is None:
            return {}
        ce, kl, teacher_ce, count = (float(v) for v in self._stats.cpu())
        self._stats = None
        n = max(count, 1.0)
        return {"ce_loss": ce / n, "kd_loss": kl / n, "teacher_ce_loss": teacher_ce / n}


def kl_calibration_loss(teacher: Teacher) -> Callable[[nn.Module, Dict[str, torch.Tensor]], Tuple[torch.Tensor, int]]:
    """A calibration loss (``pruner.LossFn``): mean KL(teacher ‖ student) per predicted token.

    Taylor scores from its gradient rank a group by how far removing it moves the model's
    distribution from the original's, rather than by its effect on the labels.
    """

    def loss_fn(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, int]:
        tokens = batch["tokens"]
        inputs = tokens[:, :-1]
        logits = model(inputs)
        chunks = logits if isinstance(logits, list) else [logits]
        teacher.set_inputs(inputs)  # the student may not be watched (e.g. a benchmark's model)
        labels = tokens[:, 1:]
        n = labels.numel()
        parts = teacher.distill(chunks, labels, alpha=1.0, temperature=1.0, grad_scale=1.0 / n)
        total = torch.stack([p.loss for p in parts]).sum() / n
        if not torch.is_grad_enabled():
            return total, n
        return loss_with_gradient(total, [p.grad.view_as(c) for p, c in zip(parts, chunks)], chunks), n

    return loss_fn
