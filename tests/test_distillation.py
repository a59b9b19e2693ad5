"""Distillation loss: parity with torchtune's losses, memory-light gradients, the teacher pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLLoss

from adapt_prune_tune.distillation import (
    DistillConfig,
    DistillationLoss,
    Teacher,
    chunk_distillation_loss,
    kl_calibration_loss,
    loss_with_gradient,
)
from adapt_prune_tune.models import DecoderArch, LayerArch, decoder_from_arch


def reference_loss(student_chunks, teacher_chunks, labels, alpha, temperature):
    """(1-α)·CE + α·T²·KL from torchtune's own chunked CE and forward-KL losses, averaged per token."""
    ce = CEWithChunkedOutputLoss(num_output_chunks=len(student_chunks))
    fkl = ForwardKLLoss()
    y = labels.chunk(len(student_chunks), dim=1)
    count = (labels != -100).sum()
    # torchtune's forward KL is the cross-entropy against the teacher; minus the teacher's
    # entropy (no student gradient) it is the KL itself.
    kl = 0.0
    for s, t, yc in zip(student_chunks, teacher_chunks, y):
        s2, t2 = s.reshape(-1, s.size(-1)) / temperature, t.reshape(-1, t.size(-1)) / temperature
        cross = fkl(s2, t2, yc.reshape(-1), normalize=False)
        logp_t = F.log_softmax(t2.float(), -1)
        entropy = -((logp_t.exp() * logp_t).sum(-1) * (yc.reshape(-1) != -100)).sum()
        kl = kl + cross - entropy
    return (1 - alpha) * ce(student_chunks, labels) + alpha * temperature**2 * kl / count


@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.3, 2.0), (0.7, 0.5)])
def test_chunk_loss_and_gradient_match_torchtune_losses(alpha, temperature):
    torch.manual_seed(0)
    B, S, V, C = 2, 12, 40, 3
    student = torch.randn(B, S, V, requires_grad=True)
    teacher = torch.randn(B, S, V)
    labels = torch.randint(0, V, (B, S))
    labels[0, :3] = -100  # padding / prompt positions
    s_chunks, t_chunks = list(student.chunk(C, dim=1)), list(teacher.chunk(C, dim=1))
    ref = reference_loss(s_chunks, t_chunks, labels, alpha, temperature)
    ref.backward()
    ref_grad = student.grad.clone()

    count = (labels != -100).sum()
    parts = [
        chunk_distillation_loss(s.detach().reshape(-1, V), t.reshape(-1, V), y.reshape(-1), alpha, temperature, -100, 1.0 / count)
        for s, t, y in zip(s_chunks, t_chunks, labels.chunk(C, dim=1))
    ]
    total = sum(p.loss for p in parts) / count
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-5)
    student.grad = None
    loss = loss_with_gradient(total, [p.grad.view_as(s) for p, s in zip(parts, s_chunks)], s_chunks)
    (3.0 * loss).backward()  # the stock loop scales the loss before backward
    torch.testing.assert_close(student.grad, 3.0 * ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(student.grad[0, :3], torch.zeros(3, V))  # ignored positions get nothing


def test_chunk_loss_parts_and_bf16_gradient():
    torch.manual_seed(1)
    s, t = torch.randn(6, 20), torch.randn(6, 20)
    y = torch.randint(0, 20, (6,))
    same = chunk_distillation_loss(s, s, y, 0.5, 1.0)
    assert same.kl.abs() < 1e-5  # identical distributions
    torch.testing.assert_close(same.ce, same.teacher_ce)
    assert int(same.count) == 6
    out = chunk_distillation_loss(s.bfloat16(), t.bfloat16(), y, 0.5, 2.0)
    assert out.grad.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert out.kl > 0
    empty = chunk_distillation_loss(s, t, torch.full((6,), -100), 0.5, 1.0)
    assert float(empty.loss) == 0.0 and int(empty.count) == 0 and not empty.grad.any()


def _tiny_arch(layers=((4, 2, 32), (4, 2, 32))):
    from adapt_prune_tune.models import RopeSpec

    return DecoderArch(
        vocab_size=64, embed_dim=16, head_dim=4, max_seq_len=64, norm_eps=1e-5,
        rope=RopeSpec(base=10000.0), tie_word_embeddings=True, attn_bias=False,
        layers=tuple(LayerArch(*l) for l in layers),
    )


def _models():
    torch.manual_seed(0)
    teacher = decoder_from_arch(_tiny_arch())
    student = decoder_from_arch(_tiny_arch(((4, 2, 16), (2, 1, 24))))
    return teacher, student


def test_distillation_loss_in_a_training_step_matches_reference():
    teacher_model, student = _models()
    reference_teacher = decoder_from_arch(_tiny_arch())
    reference_teacher.load_state_dict(teacher_model.state_dict())
    teacher = Teacher(teacher_model)
    teacher.watch(student)
    loss_fn = DistillationLoss(teacher, alpha=0.4, temperature=2.0, num_output_chunks=4)
    student.set_num_output_chunks(4)
    reference_teacher.set_num_output_chunks(4)
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)

    logits = student(tokens)
    loss = loss_fn(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    with torch.no_grad():
        t_chunks = reference_teacher(tokens)
    ref = reference_loss(student(tokens), t_chunks, labels, 0.4, 2.0)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # The teacher is frozen: no gradients, and its weights are untouched.
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
    stats = loss_fn.pop_stats()
    assert set(stats) == {"ce_loss", "kd_loss", "teacher_ce_loss"} and stats["kd_loss"] > 0
    assert loss_fn.pop_stats() == {}


def test_distillation_loss_accepts_unchunked_logits():
    teacher_model, student = _models()
    teacher = Teacher(teacher_model)
    teacher.watch(student)
    loss_fn = DistillationLoss(teacher, alpha=1.0, temperature=1.0)
    tokens = torch.randint(0, 64, (2, 10))
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    logits = student(tokens)  # [B, S, V] as the stock loop flattens it
    loss = loss_fn(logits.reshape(-1, 64), labels.reshape(-1))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_needs_a_watched_student():
    teacher_model, student = _models()
    teacher = Teacher(teacher_model)
    with pytest.raises(RuntimeError, match="watch"):
        DistillationLoss(teacher, 0.5, 1.0)([torch.zeros(1, 4, 64)], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="only called through"):
        teacher_model(torch.zeros(1, 4, dtype=torch.long))


def test_kl_calibration_loss_is_zero_at_the_teacher_and_has_gradients_after_a_change():
    teacher_model, _ = _models()
    student = decoder_from_arch(_tiny_arch())
    student.load_state_dict(teacher_model.state_dict())
    loss_fn = kl_calibration_loss(Teacher(teacher_model))
    batch = {"tokens": torch.randint(0, 64, (2, 12))}
    loss, n = loss_fn(student, batch)
    assert n == 2 * 11 and abs(float(loss.detach())) < 1e-6
    loss.backward()
    assert max(float(p.grad.abs().max()) for p in student.parameters()) < 1e-6  # why step 1 uses CE
    with torch.no_grad():
        student.layers[0].mlp.w1.weight.mul_(0.0)
    student.zero_grad()
    loss, _ = loss_fn(student, batch)
    loss.backward()
    assert float(loss.detach()) > 0 and float(student.layers[1].mlp.w2.weight.grad.abs().max()) > 0


@pytest.mark.parametrize(
    "section, message",
    [
        ({"alpha": 1.5}, "distill.alpha must be in [0, 1]"),
        ({"temperature": 0}, "distill.temperature must be a finite number > 0"),
        ({"calibration_loss": "mse"}, "distill.calibration_loss must be one of"),
        ({"alpa": 0.5}, "did you mean distill.alpha"),
    ],
)
def test_distill_config_refuses_bad_values_naming_the_key(section, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DistillConfig.from_section({"enabled": True, **section})


def test_distill_config_defaults_off():
    assert DistillConfig.from_section(None) == DistillConfig()
    assert not DistillConfig().enabled
    assert DistillConfig.from_section({"enabled": True, "teacher_model": {"_component_": "x"}}).enabled


def test_teacher_gets_its_own_copy_of_shared_weights():
    teacher_model, _ = _models()
    student = decoder_from_arch(_tiny_arch())
    state = teacher_model.state_dict()
    student.load_state_dict(state, assign=True)
    teacher_model.load_state_dict(state, assign=True)  # what one-process loading does to both
    assert teacher_model.layers[0].mlp.w1.weight.data_ptr() == student.layers[0].mlp.w1.weight.data_ptr()
    from adapt_prune_tune.distillation import own_storage_

    assert own_storage_(teacher_model, student) == len(list(teacher_model.parameters()))
    before = teacher_model.layers[0].mlp.w1.weight.clone()
    with torch.no_grad():
        student.layers[0].mlp.w1.weight.add_(1.0)  # an optimizer step on the student
    assert torch.equal(teacher_model.layers[0].mlp.w1.weight, before)
    assert own_storage_(teacher_model, student) == 0
