"""The error text a config problem shows: the root cause of a wrapped error, and a hint for
files that are not UTF-8."""

from __future__ import annotations

from adapt_prune_tune.errors import error_text, free_space_that_matters, root_cause


class Wrapped(Exception):
    pass


def test_the_root_cause_is_shown_beside_the_wrapper():
    try:
        try:
            b"\xe9".decode("utf-8")
        except UnicodeDecodeError as inner:
            raise Wrapped("An error occurred while generating the dataset") from inner
    except Wrapped as e:
        error = e
    assert isinstance(root_cause(error), UnicodeDecodeError)
    text = error_text(error, "dataset")
    assert text.startswith("Wrapped: An error occurred while generating the dataset (caused by UnicodeDecodeError: ")
    assert text.endswith("give its encoding, e.g. dataset.encoding=latin-1")


def test_an_unrelated_context_is_not_shown_and_a_plain_error_is_unchanged():
    try:
        try:
            raise KeyError("handled on the way")
        except KeyError:
            raise ValueError("the real problem")  # noqa: B904 - an implicit context, as libraries leave it
    except ValueError as e:
        assert error_text(e) == "ValueError: the real problem"
        assert root_cause(e) is e


def test_a_cause_that_repeats_the_message_is_not_repeated():
    error = RuntimeError("disk full: /tmp")
    error.__cause__ = OSError("disk full: /tmp")
    assert error_text(error) == "RuntimeError: disk full: /tmp"


def test_out_of_memory_is_told_from_other_runtime_errors():
    import torch

    from adapt_prune_tune.errors import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 68719476736 bytes."))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9.0 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_out_of_memory(MemoryError())  # Python's own: not a tensor allocation the settings size
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner  # as a compiled region reports it
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)


def test_out_of_space_is_told_from_other_write_failures():
    import errno

    from safetensors import SafetensorError

    from adapt_prune_tune.errors import is_out_of_space

    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors reports the OS error as its own, in words only
    assert is_out_of_space(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("checkpoint could not be written")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_out_of_space(wrapped)
    # a directory removed under the write, permissions, a lost mount: making room would not help
    assert not is_out_of_space(SafetensorError("Error while serializing: I/O error: No such file or directory (os error 2)"))
    assert not is_out_of_space(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_out_of_space(OSError(errno.EIO, "Input/output error"))


def test_memory_advice_names_the_phases_setting_and_halves_it():
    from adapt_prune_tune.errors import memory_advice

    sizes = dict(batch_size=4, accumulation=2, calibration_batch=8, calibration_per_rank=24, heldout_batch=4,
                 activation_checkpointing=False)
    what, changes = memory_advice("calibration", 3, **sizes)
    assert what.startswith("stage 3's calibration pass: lower pruning.calibration.batch_size (now 8; a divisor of 24")
    assert what.endswith(", or enable_activation_checkpointing=True")
    assert changes == {"pruning.calibration.batch_size": 4}
    # An odd batch of 5 over 15 windows: the largest divisor of 15 at most half of it.
    assert memory_advice("calibration", 1, **{**sizes, "calibration_batch": 5, "calibration_per_rank": 15})[1] == {
        "pruning.calibration.batch_size": 1}
    assert memory_advice("calibration", 1, **{**sizes, "calibration_batch": 6, "calibration_per_rank": 18})[1] == {
        "pruning.calibration.batch_size": 3}
    assert memory_advice("calibration", 1, **{**sizes, "calibration_batch": 1})[1] == {}  # nothing lower
    what, changes = memory_advice("training", 2, **{**sizes, "activation_checkpointing": True})
    assert "lower batch_size (now 4) and raise gradient_accumulation_steps (now 2)" in what
    assert "enable_activation_checkpointing" not in what
    assert changes == {"batch_size": 2, "gradient_accumulation_steps": 4}  # the global batch kept
    assert memory_advice("training", 2, **{**sizes, "batch_size": 3})[1] == {}  # no exact half
    assert memory_advice("heldout", 2, **sizes) == ("a held-out evaluation: lower heldout.batch_size (now 4)",
                                                    {"heldout.batch_size": 2})
    assert "run on more ranks" in memory_advice("resize", 2, **sizes)[0]


def test_free_space_is_named_only_where_it_explains_the_failure(tmp_path):
    full = OSError(28, "No space left on device")
    gone = FileNotFoundError(2, "No such file or directory")
    assert free_space_that_matters(tmp_path, full) > 0  # the disk filled up: how much is free now
    assert free_space_that_matters(tmp_path, gone) is None  # beside the point
    assert free_space_that_matters(tmp_path, gone, need=1 << 62) > 0  # less free than the write needs
    assert free_space_that_matters(tmp_path / "no" / "such" / "mount", full) is None
