"""Every dataset a run reads, read before the weights load.

The stock setup builds the data after the model: a column the data does not have, a file
that is not UTF-8, a row without text, too little calibration text or another model's
tokenizer would otherwise surface minutes (or, for a bad row, hours) into an 8B run. Each
dataset is built with the run's tokenizer, its null cells counted from Arrow's metadata, its
first sample read and, for training data, a sample of labels checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple

import torch
from omegaconf import DictConfig, ListConfig
from torchtune import config

from adapt_prune_tune.config_schema import section
from adapt_prune_tune.errors import error_text


LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow")  # datasets' builders that read data_files
# File extensions written as a source: datasets then looks for a Hub dataset of that name (tens
# of seconds offline) and fails without naming the builder that reads such files.
BUILDER_OF_EXTENSION = {"jsonl": "json", "ndjson": "json", "txt": "text", "tsv": "csv", "pq": "parquet"}


def dataset_location(node: Any) -> Tuple[str, List[Path]]:
    """("local", files) for local json/csv/... files or a local path, ("hub", []) or ("unknown", [])."""
    if not isinstance(node, DictConfig) or node.get("source", None) is None:
        return "unknown", []
    source = str(node.source)
    if source in LOCAL_BUILDERS:
        files = node.get("data_files", None)
        if files is None:
            return "unknown", []
        if isinstance(files, DictConfig):
            files = list(files.values())
        files = [files] if isinstance(files, str) else list(files)
        flat: List[Path] = []
        for f in files:
            flat += [Path(str(x)) for x in f] if not isinstance(f, str) else [Path(f)]
        return "local", flat
    if Path(source).expanduser().exists():
        return "local", [Path(source).expanduser()]
    return "hub", []


def run_datasets(cfg: DictConfig) -> Iterator[Tuple[str, Any]]:
    """(name, node) of every dataset the run reads: training (a list too) and calibration."""
    node = cfg.get("dataset", None)
    if isinstance(node, ListConfig):
        for i, single in enumerate(node):
            yield f"dataset[{i}]", single
    elif node is not None:
        yield "dataset", node
    calibration = section(cfg, "pruning.calibration")
    if calibration.get("dataset", None) is not None:
        yield "pruning.calibration.dataset", calibration.dataset


def whole_corpus_packings(cfg: DictConfig) -> List[str]:
    """The training datasets that pack their whole corpus at start, each with the fix (``packing``)."""
    from adapt_prune_tune.packing import whole_corpus_packing

    found = (whole_corpus_packing(name, node) for name, node in run_datasets(cfg) if name != "pruning.calibration.dataset")
    return [f for f in found if f]


def packed_text_caches(cfg: DictConfig) -> List[Tuple[str, Path, int]]:
    """(name, cache_dir, bytes) of the training datasets that will write packed text to disk."""
    from adapt_prune_tune.packing import packs_file_bytes

    max_seq_len = section(cfg, "tokenizer").get("max_seq_len", None)
    caches = []
    for name, node in run_datasets(cfg):
        size = None if name == "pruning.calibration.dataset" else packs_file_bytes(node, max_seq_len)
        if size is not None:
            caches.append((name, Path(str(node.cache_dir)).expanduser(), size))
    return caches


def data_problems(cfg: DictConfig) -> List[str]:
    """Local training / calibration data files and held-out texts exist."""
    problems = []
    for name, node in run_datasets(cfg):
        source = str(node.get("source", "")) if isinstance(node, DictConfig) else ""
        if source in BUILDER_OF_EXTENSION and node.get("data_files", None) is not None and not Path(source).exists():
            builder = BUILDER_OF_EXTENSION[source]
            problems.append(f"{name}.source: {source!r} is a file extension, not a datasets builder: "
                            f"{source} files load with source: {builder}"
                            + (' and delimiter: "\\t"' if source == "tsv" else ""))
            continue
        kind, files = dataset_location(node)
        missing = [str(f) for f in files if not f.expanduser().exists()]
        if kind == "local" and missing:
            problems.append(
                f"{name}: data file(s) not found: {', '.join(missing)} (source: {node.source} reads local files: "
                "fix data_files, or run `adapt-prune-tune prepare` for the packaged Python-docs corpus)"
            )
    heldout = cfg.get("heldout", None)
    if isinstance(heldout, DictConfig):
        for dotted, value in walk(heldout, "heldout"):
            if dotted.rsplit(".", 1)[-1] in ("data_dir", "data_files") and value is not None:
                for f in [value] if isinstance(value, str) else list(value):
                    if not Path(str(f)).expanduser().exists():
                        problems.append(
                            f"{dotted} not found: {f} (held-out evaluation: `adapt-prune-tune prepare` fetches "
                            "the packaged texts; `heldout: null` skips the evaluation)"
                        )
    return problems


def run_tokenizer(cfg: DictConfig) -> Tuple[Any, List[str]]:
    """The run's tokenizer, or ``None`` and why it cannot be built."""
    try:
        return config.instantiate(cfg.tokenizer), []
    except Exception as e:  # noqa: BLE001 - the builder's own words, under its key
        problem = f"tokenizer: {cfg.tokenizer.get('_component_')} cannot be built: {error_text(e)}"
        pointers = tokenizer_lfs_pointers(cfg.tokenizer)
        if pointers:
            what = "is a Git LFS pointer" if len(pointers) == 1 else "are Git LFS pointers"
            problem += (f"; {', '.join(map(str, pointers))} {what}, not the file: run `git lfs pull` in the "
                        "model's directory, or download with `tune download`")
        return None, [problem]


def tokenizer_lfs_pointers(node: DictConfig) -> List[Path]:
    """Files a tokenizer's settings name (or that lie in a directory they name) that are Git LFS
    pointers: a repository cloned without git-lfs; the builder's own error names a parse failure."""
    from adapt_prune_tune.checkpoint_checks import is_lfs_pointer

    found: List[Path] = []
    for value in node.values():
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        candidates = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
        found += [f for f in candidates if f.is_file() and is_lfs_pointer(f)]
    return found


def dataset_problems(
    cfg: DictConfig, hub: bool = True, vocab_size: Optional[int] = None, tokenizer: Any = None,
    warn: Optional[Callable[[str], None]] = None,
) -> List[str]:
    """Every dataset the run reads, built with the run's tokenizer and its first sample read, and
    the calibration windows counted, before the model loads.

    The stock setup builds the data after the weights: a column the data does not have, a
    dataset argument missing or too little calibration text would otherwise surface minutes
    into an 8B run. Packing is left out here (it rarely fails and costs a pass over the data);
    ``hub=False`` skips datasets that would be downloaded (the planner's offline view). With
    the model's ``vocab_size``, token ids the embedding does not have (another model's
    tokenizer) are found in what was read, and in the padding id. ``tokenizer``: the run's,
    when the caller has built it already (else built here). ``warn`` receives what does not
    stop a run but likely is not what its author meant (:func:`line_rows_warning`).
    """
    from adapt_prune_tune.data import calibration_batches

    if tokenizer is None:
        tokenizer, problems = run_tokenizer(cfg)
        if problems:
            return problems
    cut = cfg.tokenizer.get("max_seq_len", None)
    seed = int(cfg.get("seed", 0) or 0)

    def foreign(where: str, what: str, token_id: int) -> Optional[str]:
        if vocab_size is None or token_id < vocab_size:
            return None
        return (f"{where}: {what} {token_id:,}, outside the model's {vocab_size:,} embeddings: tokenizer.path "
                f"({cfg.tokenizer.get('path')}) is not this model's tokenizer")

    problems = []
    pad_id = getattr(tokenizer, "pad_id", None)
    if isinstance(pad_id, int) and (problem := foreign("tokenizer", "its padding id", pad_id)):
        problems.append(problem)
    for name, node in run_datasets(cfg):
        if not hub and dataset_location(node)[0] != "local":
            continue
        configured, node = node, node.copy()
        if node.get("packed", False):
            node.packed = False
            node.pop("split_long_documents", None)  # a packs-only option
        try:
            dataset = config.instantiate(node, tokenizer)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {node.get('_component_')} cannot be built: {error_text(e, name)}")
            continue
        if len(dataset) == 0:
            problems.append(f"{name}: {node.get('source', node.get('_component_'))} holds no samples")
            continue
        if problem := null_rows_problem(name, dataset):
            problems.append(problem)
            continue
        try:
            tokens = dataset[0]["tokens"]
        except Exception as e:  # noqa: BLE001
            columns = getattr(getattr(dataset, "_data", None), "column_names", None)
            hint = f" (the data's columns: {columns}; check {name}.column / column_map)" if columns else ""
            problems.append(f"{name}: its first sample cannot be read: {error_text(e, name)}{hint}")
            continue
        problem = foreign(name, "the tokenizer gives token id", max(tokens)) if tokens else None
        if problem:
            problems.append(problem)
        elif name != "pruning.calibration.dataset":
            if warn is not None:
                for warning in (line_rows_warning(name, node, dataset),
                                long_documents_warning(name, configured, dataset, tokenizer, seed)):
                    if warning:
                        warn(warning)
            if not _has_label_tokens(dataset, seed):
                problems.append(
                    f"{name}: none of the sampled examples has a label token to train on"
                    + (f" (responses cut off at tokenizer.max_seq_len = {cut} tokens?)" if cut else "")
                    + ": every optimizer step would divide by zero tokens and write NaN into the weights; raise "
                    "tokenizer.max_seq_len, shorten the prompts, or check the dataset's train_on_input / column_map"
                )
        else:
            calib = cfg.pruning.calibration
            try:
                # All ranks' windows (their split over the ranks is the table's check).
                windows = calibration_batches(dataset, int(calib.num_samples), int(calib.seq_len),
                                              int(calib.batch_size), seed=seed)
            except ValueError as e:
                problems.append(f"{e}" + (f" (each sample is cut at tokenizer.max_seq_len = {cut} tokens before "
                                          "the windows are drawn)" if cut else ""))
                continue
            problem = foreign(name, "the tokenizer gives token id", max(int(w["tokens"].max()) for w in windows))
            if problem:
                problems.append(problem)
    return problems


def read_columns(dataset: Any) -> Set[str]:
    """The columns of its data a torchtune dataset hands to the tokenizer: a text-completion
    dataset's ``column``, an SFT dataset's message-transform ``column_map`` (empty when neither
    is known: nothing is claimed about a dataset class of the user's own)."""
    column = getattr(dataset, "_column", None)
    if isinstance(column, str):
        return {column}
    transform = getattr(dataset, "_message_transform", None)
    mapping = getattr(transform, "column_map", None) or getattr(transform, "_column_map", None)
    return {value for value in mapping.values() if isinstance(value, str)} if isinstance(mapping, dict) else set()


def null_rows_problem(name: str, dataset: Any, show: int = 3) -> Optional[str]:
    """Rows whose text the tokenizer would be handed as ``None`` (a missing field in JSON, an empty
    cell in CSV or parquet), or ``None`` when there are none.

    The first sample reads fine, so without this the run fails at the first such row, minutes or
    hours in (``TextInputSequence must be str``). Arrow keeps a null count per column, so data
    without nulls costs nothing to check at any size; with nulls, only the rows a ``filter_fn``
    (a dataset built in Python) kept are counted.
    """
    data = getattr(dataset, "_data", None)
    table = getattr(data, "data", None)
    if table is None or not hasattr(table, "column") or not hasattr(data, "column_names"):
        return None
    import numpy as np

    for column in sorted(read_columns(dataset) & set(data.column_names)):
        values = table.column(column)
        if not values.null_count:
            continue
        missing = values.is_null()
        indices = getattr(data, "_indices", None)  # a filtered (or selected) dataset's row mapping
        if indices is not None:
            missing = missing.take(indices.column(0))
        rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
        if len(rows):
            first = ", ".join(str(int(i)) for i in rows[:show]) + (", ..." if len(rows) > show else "")
            return (f"{name}: column {column!r} is empty (null) in {len(rows):,} of {len(data):,} rows (row {first}): "
                    f"the run would stop at the first of them; drop those rows from the data (e.g. "
                    f"`datasets.load_dataset(...).filter(lambda row: row[{column!r}] is not None)`, saved locally)")
    return None


def line_rows_warning(name: str, node: DictConfig, dataset: Any, probe: int = 200_000) -> Optional[str]:
    """Training text read line by line from files that hold paragraphs or documents, or ``None``.

    ``datasets``' ``text`` builder makes one row of every line by default (``sample_by: line``),
    and every row is a document of its own to the model: unpacked, a sample; packed, a segment
    the others are masked from. Text files of prose, code or documentation then train on one
    line of context at a time, and every blank line becomes a BOS-EOS sample: nothing fails,
    the model just learns less. Blank rows are the tell (a file of one document per line has
    few): past 1 % of the first ``probe`` rows, the warning says so with the fix.
    """
    if str(node.get("source", "")) != "text" or str(node.get("sample_by", "line")) != "line":
        return None
    data, column = getattr(dataset, "_data", None), getattr(dataset, "_column", None)
    table = getattr(data, "data", None)
    if table is None or not isinstance(column, str) or column not in getattr(data, "column_names", ()):
        return None
    import pyarrow.compute as pc

    values = table.column(column).slice(0, probe)
    if len(values) == 0:
        return None
    blank = int(pc.sum(pc.equal(pc.utf8_trim_whitespace(values), "")).as_py() or 0)
    if blank < 0.01 * len(values):
        return None
    chars = int(pc.sum(pc.utf8_length(values)).as_py() or 0)
    return (f"{name}: datasets' `text` builder reads one row per line, and each row is a separate document "
            f"to the model: {blank:,} of the first {len(values):,} rows ({blank / len(values):.0%}) are blank "
            f"lines and a row averages {chars / len(values):.0f} characters, so these files hold paragraphs or "
            f"documents the model would only ever see one line of at a time. Add {name}.sample_by=paragraph "
            f"(rows split at blank lines) or {name}.sample_by=document (one row per file); for one document "
            f"per line on purpose, drop the blank lines with a filter_fn")


def long_documents_warning(name: str, node: DictConfig, dataset: Any, tokenizer: Any, seed: int,
                           probe: int = 256) -> Optional[str]:
    """Packed training documents that ``tokenizer.max_seq_len`` cuts off, and how much of their
    text that drops, or ``None`` below 10 % of the sampled text's tokens.

    torchtune's text-completion dataset keeps a document's first ``max_seq_len - 1`` tokens and
    drops the rest, also when it packs. Packs read as pre-training on a corpus, but on a web
    corpus the long documents (books, papers, code) hold much of the text, so the run trains on
    a mix skewed towards short pages without saying so. Unpacked samples are cut by design (one
    sample, one sequence) and are not warned about. ``node``: the dataset as configured
    (``split_long_documents`` already keeps them whole).
    """
    cut = getattr(tokenizer, "max_seq_len", None)
    data, column = getattr(dataset, "_data", None), getattr(dataset, "_column", None)
    if (cut is None or data is None or not isinstance(column, str) or node.get("packed", False) is not True
            or node.get("split_long_documents", False)):
        return None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:probe].tolist()
    texts = (data[i][column] for i in order)  # one row read each
    lengths = [len(tokenizer.encode(str(text), add_bos=True, add_eos=True)) for text in texts if text is not None]
    total = sum(lengths)
    lost = sum(max(0, n - (cut - 1)) for n in lengths)
    if not total or lost < 0.1 * total:
        return None
    longer = sum(n > cut - 1 for n in lengths)
    if node.get("_component_") == "adapt_prune_tune.packing.packed_text_dataset":
        fix = f"set {name}.split_long_documents=True to pack them whole, in pieces of {cut:,} tokens"
    else:
        fix = (f"to keep them, pack with {name}._component_=adapt_prune_tune.packing.packed_text_dataset and "
               f"{name}.split_long_documents=True")
    return (f"{name}: {longer} of {len(lengths)} sampled documents are longer than tokenizer.max_seq_len = {cut:,} "
            f"tokens and are cut there, dropping {lost / total:.0%} of the sampled text's tokens (the longest "
            f"documents, often books, papers and code, lose the most); {fix}")


def _has_label_tokens(dataset: Any, seed: int, probe: int = 64) -> bool:
    """Whether any of ``probe`` seeded samples has a label that is not ignored (datasets without
    labels, which the collate derives from the tokens, count as having them)."""
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:probe]
    for i in order.tolist():
        labels = dataset[i].get("labels")
        if labels is None or any(label != CROSS_ENTROPY_IGNORE_IDX for label in labels):
            return True
    return False


def walk(node: Any, prefix: str) -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every leaf under ``node``."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from walk(node.get(key), f"{prefix}.{key}")
    else:
        yield prefix, node
