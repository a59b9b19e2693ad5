"""Benchmark a (pruned) model with lm-evaluation-harness, in process.

Two ways in:

* a torchtune ``TransformerDecoder`` still in memory (the recipe's model between stages or
  right after pruning), wrapped by :class:`TorchtuneLM`, so no export round trip is needed;
* an exported Hugging Face directory, loaded with ``transformers`` and handed to lm-eval's own
  ``HFLM``, which is what users of the export will run.

Tasks come in presets. :data:`PAPER_TASKS` is the paper's protocol (METHOD.md, section 5):
lm-eval's standard tasks, each with the shot count and the metric the paper reports. Their
datasets live on the Hugging Face Hub; without network access :func:`evaluate` stops with
:class:`BenchmarkDataUnavailable`, which names the offline alternative.
:data:`LOCAL_TASKS` are lm-eval tasks built by :func:`build_local_tasks` from a held-out
JSONL corpus on disk (by default the Python-docs ``eval.jsonl`` of
:mod:`adapt_prune_tune.corpus`): held-out perplexity through ``loglikelihood_rolling`` and a
next-sentence multiple-choice task, so the whole lm-eval path runs offline on real text.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from adapt_prune_tune.eval_tasks import (
    NEXT_SENTENCE_TASK,
    PERPLEXITY_TASK,
    build_local_tasks,
    default_heldout_jsonl,
)

# {task: {metric: value}}; a metric's standard error, when lm-eval gives one, is stored
# next to it as "<metric>_stderr", so a table is a plain JSON-able dict the report can use.
ResultTable = Dict[str, Dict[str, float]]


# --------------------------------------------------------------------------------------------
# Task presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark of a preset: an lm-eval task (or group) and how the paper reads it.

    Attributes:
        task (str): lm-eval task, group or tag name.
        metrics (Tuple[str, ...]): metrics to report; empty reports every metric lm-eval gives.
        num_fewshot (Optional[int]): shots for every task under ``task``; None keeps the
            task's own configuration.
    """

    task: str
    metrics: Tuple[str, ...] = ()
    num_fewshot: Optional[int] = None


PAPER_TASKS: Tuple[TaskSpec, ...] = (
    TaskSpec("arc_easy", ("acc_norm",), 0),
    TaskSpec("arc_challenge", ("acc_norm",), 0),
    TaskSpec("boolq", ("acc",), 0),
    TaskSpec("hellaswag", ("acc_norm",), 0),
    TaskSpec("openbookqa", ("acc_norm",), 0),
    TaskSpec("piqa", ("acc_norm",), 0),
    TaskSpec("social_iqa", ("acc",), 0),
    TaskSpec("winogrande", ("acc",), 0),
    TaskSpec("wikitext", ("word_perplexity",), 0),
    # Direct-answer BBH (lm-eval's plain "bbh" group is the chain-of-thought variant); its
    # YAMLs carry three fixed exemplars per subtask.
    TaskSpec("bbh_fewshot", ("exact_match",), 3),
    # The paper says 1-shot, but truthfulqa_mc2 pins num_fewshot: 0 (its prompt already holds
    # a fixed six-question primer) and lm-eval ignores a global --num_fewshot for tasks pinned
    # to 0, so a harness run "with 1 shot" scores this standard prompt; the preset says so.
    TaskSpec("truthfulqa_mc2", ("acc",), 0),
    # The English multiple-choice AGIEval subsets, the group that aggregates acc_norm.
    TaskSpec("agieval_nous", ("acc_norm",), 0),
    TaskSpec("mmlu", ("acc",), 5),
)

# The Hub dataset (and config) each paper task reads in lm-eval 0.4, for model cards' model-index.
TASK_DATASETS: Dict[str, Tuple[str, Optional[str]]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "boolq": ("aps/super_glue", "boolq"),
    "hellaswag": ("Rowan/hellaswag", None),
    "openbookqa": ("allenai/openbookqa", "main"),
    "piqa": ("baber/piqa", None),
    "social_iqa": ("lighteval/siqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"),
    "bbh_fewshot": ("SaylorTwift/bbh", None),
    "truthfulqa_mc2": ("truthfulqa/truthful_qa", "multiple_choice"),
    "agieval_nous": ("hails/agieval", None),
    "mmlu": ("cais/mmlu", None),
}

LOCAL_TASKS: Tuple[TaskSpec, ...] = (
    TaskSpec(PERPLEXITY_TASK, ("word_perplexity", "byte_perplexity", "bits_per_byte"), 0),
    TaskSpec(NEXT_SENTENCE_TASK, ("acc", "acc_norm"), 0),
)

PRESETS: Dict[str, Tuple[TaskSpec, ...]] = {"paper": PAPER_TASKS, "local": LOCAL_TASKS}
_LOCAL_NAMES = frozenset(spec.task for spec in LOCAL_TASKS)


@dataclass(frozen=True)
class LocalTaskSize:
    """How much of the held-out split the local tasks score.

    Attributes:
        documents (Optional[int]): held-out rows (chunks of the documentation, up to ~10k
            characters, ~900 tokens on average) scored by rolling log-likelihood, a
            deterministic random subset; None scores all 363.
        examples (Optional[int]): next-sentence questions (four choices each).
    """

    documents: Optional[int]
    examples: Optional[int]


# "quick" (``adapt-prune-tune eval``'s default) is a fixed random ~11% of the split's tokens, with
# standard errors; "full" (``evaluate``'s default, ``eval --full``) is the whole split. Costs:
# ``adapt-prune-tune eval --help``.
LOCAL_SIZES: Dict[str, LocalTaskSize] = {
    "quick": LocalTaskSize(documents=40, examples=200),
    "full": LocalTaskSize(documents=None, examples=1000),
}


def describe_local_size(size: LocalTaskSize, total_documents: Optional[int] = None) -> Dict[str, str]:
    """What each local task scores at ``size``, in words (for saved results and model cards)."""
    of = f" of {total_documents}" if total_documents else ""
    documents = "all" if size.documents is None else f"{size.documents}{of}"
    if size.documents is not None and total_documents is not None and size.documents >= total_documents:
        documents = f"all {total_documents}"
    examples = "all" if size.examples is None else f"up to {size.examples}"
    return {
        PERPLEXITY_TASK: f"{documents} held-out chunks (a fixed random subset unless all)",
        NEXT_SENTENCE_TASK: f"{examples} next-sentence questions",
    }


class BenchmarkDataUnavailable(RuntimeError):
    """A benchmark's dataset could not be loaded (typically: no access to the HF Hub)."""


def resolve_tasks(tasks: Union[str, Sequence[Union[str, TaskSpec]]]) -> List[TaskSpec]:
    """Expand preset names (``"paper"``, ``"local"``) and bare lm-eval task names to specs.

    A bare task name reports all of its metrics with the task's own shot count.
    """
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    specs: List[TaskSpec] = []
    for item in items:
        if isinstance(item, TaskSpec):
            specs.append(item)
        elif item in PRESETS:
            specs.extend(PRESETS[item])
        else:
            specs.append(TaskSpec(item))
    if not specs:
        raise ValueError("No tasks to evaluate")
    return specs


# --------------------------------------------------------------------------------------------
# A torchtune model as an lm-eval LM
# --------------------------------------------------------------------------------------------


def _as_logits(output: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
    """torchtune decoders return a list of sequence chunks when chunked output is enabled."""
    return torch.cat(output, dim=1) if isinstance(output, list) else output


class TorchtuneLM(TemplateLM):
    """An lm-eval language model backed by a torchtune decoder and model tokenizer.

    Scoring follows lm-eval's Hugging Face backend, so that a model scores the same in
    memory and after export: a (context, continuation) pair is tokenized as a whole and split
    where the context's tokens end; inputs longer than ``max_seq_len`` lose tokens on the
    left; rolling log-likelihood scores every token exactly once in disjoint windows of
    ``max_seq_len`` tokens, the first conditioned on ``prefix_token_id``. One difference:
    rolling windows here never contain the BOS the tokenizer may add, only the prefix token
    (``HFLM`` adds both for tokenizers that add a BOS, e.g. Llama 3; none for SmolLM2/Qwen2.5).

    The model is switched to eval mode (and back) around every call; weights stay in their
    dtype, ``dtype`` only sets an autocast compute dtype.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder``.
        tokenizer (Any): a torchtune model tokenizer: ``encode(text, add_bos, add_eos)``,
            ``decode(ids)``, ``bos_id`` (may be None), ``eos_id``, ``pad_id``, and optionally
            ``stop_tokens``.
        batch_size (int): sequences per forward pass. Default 8.
        max_seq_len (Optional[int]): longest input; default (and upper bound) the model's.
        device (Optional[Union[str, torch.device]]): where to run; the model is moved there.
            Default: the device of the model's parameters.
        dtype (Optional[torch.dtype]): autocast compute dtype (e.g. ``torch.bfloat16``);
            None runs in the weights' dtype. Default None.
        max_gen_toks (int): default generation budget when a task sets none. Default 256.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_seq_len: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.model.to(self._device)
        self.max_length = min(max_seq_len or model.max_seq_len, model.max_seq_len)
        self.dtype = dtype
        self.max_gen_toks = max_gen_toks

    # ----- tokenization -----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # The token a text is conditioned on when it has no context, as in lm-eval's HFLM.
        bos = getattr(self.tokenizer, "bos_id", None)
        return self.eot_token_id if bos is None else bos

    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any
    ) -> List[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens is not False, add_eos=False)

    def tok_decode(self, tokens: List[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ----- model calls -----
    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode, no autograd and the autocast dtype, restoring the training mode after."""
        was_training = self.model.training
        self.model.eval()
        autocast = torch.autocast(
            device_type=self._device.type,
            dtype=self.dtype or torch.float32,
            enabled=self.dtype is not None,
        )
        try:
            with torch.no_grad(), autocast:
                yield
        finally:
            self.model.train(was_training)

    def _score_batch(
        self, batch: Sequence[Tuple[List[int], List[int]]]
    ) -> List[Tuple[float, bool]]:
        """Log-likelihood and greedy-match of each (context tokens, continuation tokens)."""
        inputs = []
        for context, continuation in batch:
            if not continuation:
                raise ValueError("Cannot score an empty continuation")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"Continuation of {len(continuation)} tokens exceeds "
                    f"max_seq_len {self.max_length}"
                )
            # The last token is only predicted, never fed; too long inputs lose their left end.
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
        width = max(len(tokens) for tokens in inputs)
        # Right padding: causal attention keeps padded tail positions out of real ones.
        tokens = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
        for row, sequence in enumerate(inputs):
            tokens[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        logits = _as_logits(self.model(tokens.to(self._device)))
        scores = []
        for row, (sequence, (_, continuation)) in enumerate(zip(inputs, batch)):
            end = len(sequence)
            logprobs = F.log_softmax(logits[row, end - len(continuation) : end].float(), dim=-1)
            target = torch.tensor(continuation, device=logprobs.device)
            logprob = logprobs.gather(-1, target[:, None]).sum().item()
            scores.append((logprob, bool((logprobs.argmax(-1) == target).all())))
        return scores

    def _score(
        self, pairs: Sequence[Tuple[List[int], List[int]]], disable_tqdm: bool = False
    ) -> List[Tuple[float, bool]]:
        """Score all pairs in batches of similar length (longest first), in input order."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        with self._inference(), tqdm(total=len(pairs), disable=disable_tqdm, desc="Scoring") as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, score in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                    scores[i] = score
                bar.update(len(chunk))
        return scores  # type: ignore[return-value]

    # ----- lm-eval API -----
    def _loglikelihood_tokens(
        self,
        requests: List[Tuple[Tuple[str, str], List[int], List[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> List[Tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return self._score(pairs, disable_tqdm)

    def rolling_windows(self, tokens: List[int]) -> List[Tuple[List[int], List[int]]]:
        """Disjoint (context, continuation) windows covering ``tokens`` once each."""
        windows = get_rolling_token_windows(
            token_list=tokens,
            prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length,
            context_len=1,
        )
        return [make_disjoint_window(window) for window in windows]

    def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
        owners: List[int] = []
        windows: List[Tuple[List[int], List[int]]] = []
        for index, (text,) in enumerate(request.args for request in requests):
            text_windows = self.rolling_windows(self.tok_encode(text, add_special_tokens=False))
            windows.extend(text_windows)
            owners.extend([index] * len(text_windows))
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows, disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
        # Requests with the same generation settings are batched together, longest first.
        groups: Dict[str, List[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(
                index
            )
        outputs: List[str] = [""] * len(requests)
        for indices in groups.values():
            until, max_new = self._generation_settings(requests[indices[0]].args[1])
            budget = self.max_length - max_new
            prompts = {i: self.tok_encode(requests[i].args[0])[-budget:] for i in indices}
            indices.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._greedy_generate([prompts[i] for i in chunk], max_new, until)
                for i, text in zip(chunk, texts):
                    outputs[i] = text
        return outputs

    def _generation_settings(self, gen_kwargs: Mapping[str, Any]) -> Tuple[List[str], int]:
        """Stop strings and token budget of a generate_until request (greedy decoding only)."""
        if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature", 1.0) > 0:
            raise ValueError(
                "TorchtuneLM decodes greedily; sampling (do_sample=True) is not supported"
            )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if max_new >= self.max_length:
            raise ValueError(
                f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} tokens"
            )
        return until, max_new

    def _stop_token_ids(self) -> set:
        return {self.tokenizer.eos_id, *getattr(self.tokenizer, "stop_tokens", [])}

    def _greedy_generate(
        self, prompts: List[List[int]], max_new: int, until: List[str]
    ) -> List[str]:
        """Greedy continuations of left-padded prompts with a temporary KV cache, cut at the
        first stop token or stop string."""
        from torchtune.generation import (
            get_causal_mask_from_padding_mask,
            get_position_ids_from_padding_mask,
        )
        from torchtune.modules.common_utils import local_kv_cache

        width = max(len(prompt) for prompt in prompts)
        total = width + max_new
        tokens = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        padding = torch.ones((len(prompts), total), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            padding[row, : width - len(prompt)] = False
        tokens, padding = tokens.to(self._device), padding.to(self._device)
        masks = get_causal_mask_from_padding_mask(padding, target_seq_len=total)
        positions = get_position_ids_from_padding_mask(padding)
        generated: List[List[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stop_ids = self._stop_token_ids()
        cache_dtype = self.dtype or next(self.model.parameters()).dtype
        with (
            self._inference(),
            local_kv_cache(
                self.model,
                batch_size=len(prompts),
                device=self._device,
                dtype=cache_dtype,
                decoder_max_seq_len=total,
            ),
        ):
            step_input, start = tokens, 0
            for _ in range(max_new):
                end = start + step_input.shape[1]
                logits = _as_logits(
                    self.model(
                        step_input, mask=masks[:, start:end], input_pos=positions[:, start:end]
                    )
                )
                next_tokens = logits[:, -1].argmax(-1)
                for row, token in enumerate(next_tokens.tolist()):
                    if done[row]:
                        continue
                    if token in stop_ids:
                        done[row] = True
                        continue
                    generated[row].append(token)
                    done[row] = any(stop in self.tok_decode(generated[row]) for stop in until)
                if all(done):
                    break
                step_input, start = next_tokens[:, None], end
        return [_cut_at_stop(self.tok_decode(ids), until) for ids in generated]


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]


# --------------------------------------------------------------------------------------------
# Running lm-eval
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _one_bar_hflm() -> type:
    """lm-eval's ``HFLM``, scoring all rolling windows of all documents in one call.

    The stock ``loglikelihood_rolling`` scores one batch of windows per call, and every call
    draws its own progress bar: hundreds of bars for a held-out split, and no ETA. One call
    over every window gives one bar whose ETA covers the task (longest windows come first,
    so the early ETA errs high). Scores are the same: the windows and their scoring are
    lm-eval's own.
    """
    from lm_eval.models.huggingface import HFLM

    class OneBarHFLM(HFLM):
        def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
            if self.world_size > 1:  # the stock method pads ranks to equal work
                return super().loglikelihood_rolling(requests, disable_tqdm)
            owners: List[int] = []
            windows: List[Tuple[Any, ...]] = []
            for index, (text,) in enumerate(request.args for request in requests):
                rolling = get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
                for window in map(make_disjoint_window, rolling):
                    windows.append((None, *window))
                    owners.append(index)
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
                totals[owner] += logprob
            return totals

    return OneBarHFLM


def _hf_lm(
    model_dir: Path,
    *,
    batch_size: int,
    max_seq_len: Optional[int],
    device: str,
    dtype: Optional[torch.dtype],
) -> Any:
    """lm-eval's HFLM over an exported directory. Exports whose config maps Auto classes to
    their own modeling code (``auto_map``, per-layer widths) are loaded with
    ``trust_remote_code``: that code ships inside the directory being evaluated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    trust_remote_code = "auto_map" in config
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype or "auto", trust_remote_code=trust_remote_code
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return _one_bar_hflm()(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_seq_len
    )


def load_tasks(
    specs: Sequence[TaskSpec], task_manager: Any
) -> Tuple[List[Any], Dict[str, List[str]]]:
    """Build lm-eval Task/Group objects and apply each spec's shot count to its leaf tasks.

    simple_evaluate's ``num_fewshot`` is one number for all tasks (and ignored by tasks
    pinned to 0), so per-benchmark shots are set on the built tasks instead. Building a task
    loads its dataset, so a missing dataset is reported here, naming the task.

    Returns:
        Tuple[List[Any], Dict[str, List[str]]]: the objects for ``simple_evaluate`` and the
        leaf task names of each spec.
    """
    objects: List[Any] = []
    leaves: Dict[str, List[str]] = {}
    for spec in specs:
        try:
            loaded = task_manager.load([spec.task])
        except KeyError as error:
            raise ValueError(f"lm-eval knows no task, group or tag named {spec.task!r}") from error
        except OSError as error:  # datasets/hub: ConnectionError, FileNotFoundError
            raise BenchmarkDataUnavailable(
                f"The dataset of lm-eval task {spec.task!r} could not be loaded ({error}). "
                "The paper's benchmarks (tasks='paper') download their datasets from the "
                "Hugging Face Hub and need network access (or a populated HF datasets cache). "
                "Offline, evaluate with tasks='local' (LOCAL_TASKS): perplexity and "
                "next-sentence choice built from the held-out corpus on disk."
            ) from error
        if spec.num_fewshot is not None:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
        group = loaded["groups"].get(spec.task)
        objects.extend([group] if group is not None else loaded["tasks"].values())
        leaves[spec.task] = list(loaded["tasks"])
    return objects, leaves


def _metric_keys(result: Mapping[str, Any]) -> Dict[str, str]:
    """Map metric names to lm-eval's ``"<metric>,<filter>"`` keys, preferring filter "none"."""
    keys: Dict[str, str] = {}
    for key in result:
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        if metric not in keys or filter_name == "none":
            keys[metric] = key
    return keys


def extract_metrics(result: Mapping[str, Any], metrics: Sequence[str]) -> Dict[str, float]:
    """The requested metrics (all if none requested) of one lm-eval result entry, each with
    its ``<metric>_stderr`` when lm-eval computed one."""
    keys = _metric_keys(result)
    wanted = list(metrics) or sorted(keys)
    missing = [m for m in wanted if m not in keys]
    if missing:
        raise ValueError(f"lm-eval reported no {missing}; available: {sorted(keys)}")
    row: Dict[str, float] = {}
    for metric in wanted:
        row[metric] = float(result[keys[metric]])
        # "N/A" where lm-eval has no standard error (perplexities, bootstrap_iters=0).
        stderr = result.get(keys[metric].replace(",", "_stderr,", 1))
        if isinstance(stderr, (int, float)):
            row[f"{metric}_stderr"] = float(stderr)
    return row


ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def ratio_stderr(pairs: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Negative log-likelihood per unit, ``R = Σ nll_i / Σ n_i``, and its standard error.

    Documents are the sampled units (a perplexity over a random subset of documents estimates
    the split's); ``R`` is a ratio of two sums, so its variance is the delta method's
    ``Σ (nll_i − R·n_i)² / (N (N−1) n̄²)``. NaN with fewer than two documents.

    Args:
        pairs: ``(log-likelihood, units)`` per document (units: words or bytes), as lm-eval's
            rolling tasks record them.

    Returns:
        Tuple[float, float]: ``R`` and its standard error.
    """
    if not pairs:
        raise ValueError("no documents")
    nll = [-loglikelihood for loglikelihood, _ in pairs]
    units = [float(n) for _, n in pairs]
    ratio = sum(nll) / sum(units)
    count = len(pairs)
    if count < 2:
        return ratio, math.nan
    mean_units = sum(units) / count
    variance = sum((x - ratio * n) ** 2 for x, n in zip(nll, units)) / (count * (count - 1) * mean_units**2)
    return ratio, math.sqrt(variance)


def rolling_stderrs(samples: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
    """``<metric>_stderr`` of the perplexity metrics of a rolling-log-likelihood task from its
    logged samples (lm-eval reports none: ``weighted_perplexity`` has no standard error).
    A perplexity ``exp(R)`` gets ``exp(R)·se(R)``, bits per byte ``se(R)/ln 2``."""
    out: Dict[str, float] = {}
    for metric in ROLLING_METRICS:
        pairs = [tuple(sample[metric]) for sample in samples if isinstance(sample.get(metric), (list, tuple))]
        if len(pairs) < 2:
            continue
        ratio, stderr = ratio_stderr(pairs)
        out[f"{metric}_stderr"] = stderr / math.log(2) if metric == "bits_per_byte" else math.exp(ratio) * stderr
    return out


def summarize_results(
    results: Mapping[str, Any], specs: Sequence[TaskSpec], leaves: Mapping[str, Sequence[str]]
) -> ResultTable:
    """The compact table of ``simple_evaluate``'s output: one row per spec (a group's
    aggregate), or one per leaf task for tags and groups without an aggregate."""
    table: ResultTable = {}
    per_task = results["results"]
    samples = results.get("samples") or {}
    for spec in specs:
        aggregated = spec.task in per_task and _metric_keys(per_task[spec.task])
        names = [spec.task] if aggregated else leaves[spec.task]
        for name in names:
            table[name] = extract_metrics(per_task[name], spec.metrics)
            for key, value in rolling_stderrs(samples.get(name, [])).items():
                if key[: -len("_stderr")] in table[name] and key not in table[name]:
                    table[name][key] = value
    return table


def evaluate(
    model: Union[nn.Module, str, Path],
    tasks: Union[str, Sequence[Union[str, TaskSpec]]] = "paper",
    *,
    tokenizer: Any = None,
    heldout_jsonl: Optional[Union[str, Path]] = None,
    local_task_dir: Optional[Union[str, Path]] = None,
    batch_size: int = 8,
    max_seq_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    limit: Optional[Union[int, float]] = None,
    local_size: Union[str, LocalTaskSize] = "full",
    bootstrap_iters: int = 100_000,
    seed: int = 1234,
) -> ResultTable:
    """Evaluate a model with lm-eval and return ``{task: {metric: value, metric_stderr: ...}}``.

    Args:
        model: a torchtune decoder in memory (then ``tokenizer`` is required) or the path of
            an exported Hugging Face model directory (evaluated with lm-eval's ``HFLM``).
        tasks: ``"paper"``, ``"local"``, or a list of preset names, lm-eval task names and
            :class:`TaskSpec`. Default ``"paper"``.
        tokenizer: torchtune model tokenizer of an in-memory model.
        heldout_jsonl: held-out text for the local tasks; default the project's
            ``<cache>/data/python-docs/eval.jsonl``. Ignored when ``local_task_dir`` is given.
        local_task_dir: an existing :func:`build_local_tasks` directory to reuse; by default
            the local tasks are built into a temporary directory for this call.
        batch_size: sequences per forward pass. Default 8.
        max_seq_len: longest input (rolling-perplexity window); default the model's.
        device: where to run; default the model's device (in memory) or CUDA if available.
        dtype: compute dtype: autocast for in-memory models, load dtype for exports (default
            the export's own). The paper evaluates in ``torch.bfloat16``.
        limit: evaluate only the first ``limit`` documents of each task (a fraction if < 1).
        local_size: how much of the held-out split the local tasks score when they are built
            here: ``"full"`` (default; the whole split), ``"quick"`` (the CLI's default, see
            :data:`LOCAL_SIZES`) or a :class:`LocalTaskSize`. Ignored with ``local_task_dir``.
        bootstrap_iters: lm-eval bootstrap iterations for standard errors (0 disables them,
            and the standard errors of perplexities, computed from the logged documents).
        seed: seed of python, numpy, torch and few-shot sampling.

    Returns:
        ResultTable: one row per task (or per leaf task of groups without an aggregate).

    Raises:
        BenchmarkDataUnavailable: a task's dataset could not be loaded (no network).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(model, (str, Path)) and not (Path(model) / "config.json").is_file():
        # Before the task index and the datasets: a run directory is the usual mix-up.
        raise FileNotFoundError(
            f"{model} is not a Hugging Face model directory (no config.json); a run's output_dir or its "
            f"final/ checkpoint is exported first: `adapt-prune-tune export {model} OUT`, then evaluate OUT"
        )
    specs = resolve_tasks(tasks)
    if isinstance(local_size, str):
        if local_size not in LOCAL_SIZES:
            raise ValueError(f"local_size must be one of {sorted(LOCAL_SIZES)} or a LocalTaskSize, got {local_size!r}")
        local_size = LOCAL_SIZES[local_size]
    needs_local = any(spec.task in _LOCAL_NAMES for spec in specs)
    needs_hub = any(spec.task not in _LOCAL_NAMES for spec in specs)
    with tempfile.TemporaryDirectory(prefix="apt-lm-eval-tasks-") as scratch:
        include_path = None
        if needs_local:
            include_path = str(
                local_task_dir
                or build_local_tasks(
                    heldout_jsonl or default_heldout_jsonl(),
                    Path(scratch),
                    max_documents=local_size.documents,
                    max_next_sentence_examples=local_size.examples,
                )
            )
        # The built-in index takes seconds to build; local-only runs skip it.
        task_manager = TaskManager(include_path=include_path, include_defaults=needs_hub)
        task_objects, leaves = load_tasks(specs, task_manager)

        if isinstance(model, (str, Path)):
            lm = _hf_lm(
                Path(model),
                batch_size=batch_size,
                max_seq_len=max_seq_len,
                device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                dtype=dtype,
            )
        else:
            if tokenizer is None:
                raise ValueError("Evaluating a model in memory needs its tokenizer")
            lm = TorchtuneLM(
                model,
                tokenizer,
                batch_size=batch_size,
                max_seq_len=max_seq_len,
                device=device,
                dtype=dtype,
            )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_objects,
            task_manager=task_manager,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            # Per-document results, for the standard errors of perplexities (rolling_stderrs).
            log_samples=bootstrap_iters > 0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return summarize_results(results, specs, leaves)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _format_value(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def evaluation_markdown(tables: Mapping[str, ResultTable]) -> str:
    """A Markdown table of one or more models' results: a row per (task, metric), a column
    per model label, ``value ± stderr`` where a standard error exists."""
    labels = list(tables)
    rows: List[Tuple[str, str]] = []
    for table in tables.values():
        for task, metrics in table.items():
            for metric in metrics:
                if not metric.endswith("_stderr") and (task, metric) not in rows:
                    rows.append((task, metric))
    lines = [
        "| task | metric | " + " | ".join(labels) + " |",
        "|---|---|" + "---:|" * len(labels),
    ]
    for task, metric in rows:
        cells = []
        for label in labels:
            metrics = tables[label].get(task, {})
            if metric not in metrics:
                cells.append("–")
                continue
            cell = _format_value(metrics[metric])
            if f"{metric}_stderr" in metrics:
                cell += f" ± {_format_value(metrics[f'{metric}_stderr'])}"
            cells.append(cell)
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
