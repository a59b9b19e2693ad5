"""The embedded default model through our torchtune builder: parity, knowledge, perplexity."""

import math

import pytest
import torch

from adapt_prune_tune.corpus import heldout_text
from adapt_prune_tune.models import SMOLLM2_135M, arch_from_model, decoder_from_arch, load_hf_model
from adapt_prune_tune.pruner import next_token_loss
from adapt_prune_tune.tokenizer import smollm2_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, arch = load_hf_model(smollm2_dir)
    return model.eval(), arch


def test_builder_matches_the_checkpoint(smollm2):
    model, arch = smollm2
    assert arch.layers == SMOLLM2_135M.layers and arch.rope == SMOLLM2_135M.rope
    assert arch.tie_word_embeddings and arch_from_model(model).layers == arch.layers
    assert sum(p.numel() for p in model.parameters()) == arch.num_params() == 134_515_008


def test_logits_equal_transformers(smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM

    model, _ = smollm2
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"max |logits diff| torchtune vs transformers (fp32): {diff:.2e}")
    assert diff < 1e-3


def test_greedy_continuation_knows_paris(smollm2, smollm2_dir):
    model, _ = smollm2
    tok = smollm2_tokenizer(str(smollm2_dir))
    tokens = torch.tensor([tok.encode("The capital of France is", add_bos=False, add_eos=False)])
    with torch.no_grad():
        for _ in range(4):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert "Paris" in tok.decode(tokens[0].tolist())


def _perplexity(model, windows):
    with torch.no_grad():
        return math.exp(sum(float(next_token_loss(model, {"tokens": w[None]})[0]) for w in windows) / len(windows))


def test_heldout_perplexity_is_tens_and_random_init_is_tens_of_thousands(smollm2, smollm2_dir, python_docs_dir):
    model, arch = smollm2
    tok = smollm2_tokenizer(str(smollm2_dir))
    windows = torch.tensor(tok.encode(heldout_text(python_docs_dir.parent.parent))[:2048]).view(4, 512)
    trained = _perplexity(model, windows)
    torch.manual_seed(0)
    random_model = decoder_from_arch(arch)
    for p in random_model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for m in random_model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    random_ppl = _perplexity(random_model.eval(), windows)
    print(f"held-out perplexity: SmolLM2 {trained:.2f}, random init {random_ppl:.0f}")
    assert 5 < trained < 100
    assert 10_000 < random_ppl < 1_000_000
