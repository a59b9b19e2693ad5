"""The error text a config problem shows: the root cause of a wrapped error, and a hint for
files that are not UTF-8."""

from __future__ import annotations

from adapt_prune_tune.errors import error_text, root_cause


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
