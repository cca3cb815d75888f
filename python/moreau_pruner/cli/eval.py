"""``moreau-eval``: zero-shot accuracy of a dense, pruned or recovered model with lm-evaluation-harness
(:mod:`moreau_pruner.evaluate.zeroshot` does the work)."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ..evaluate.zeroshot import (PAPER_TASKS, INSTALL_HINT, ZERO_SHOT_KEY, evaluate_zero_shot,
                                 format_table, parse_tasks, require_lm_eval, resolve_include_paths,
                                 write_into_pruning_info)
from ..io.atomic import write_json
from . import options as opt

DESCRIPTION = f"""\
Zero-shot accuracy of a dense, pruned or recovered model with lm-evaluation-harness.

The model is loaded by this package (a pruned directory needs no trust_remote_code) and handed to
lm-eval's HFLM; every task is scored by log-likelihood: acc (the most likely choice) and, where the
task defines it, acc_norm (likelihood per character), each with its standard error. The table is
printed, saved with --json, and written into the model directory's pruning_info.json under
"zero_shot" when it has one.

--tasks paper is the set of LLM-Pruner's and MoreauPruner's tables:
{", ".join(PAPER_TASKS)}.
Their datasets come from the Hugging Face hub: nothing is downloaded unless --allow-download is
given, so without it they run only where the local datasets cache has them. Local tasks
(lm-eval YAML + data files) run offline with --include-path DIR.

Needs the extra `eval`: {INSTALL_HINT}"""

EPILOG = """\
examples:
  moreau-eval --model pruned-smollm2 --tasks paper
  moreau-eval --model pruned-smollm2 --tasks piqa,arc_easy --device cuda --dtype bfloat16 --json zs.json
  moreau-eval --model pruned-smollm2 --tasks moreau_tiny_facts --include-path tests/data/zeroshot
  moreau-eval --tasks moreau_tiny_facts --include-path tests/data/zeroshot   # the embedded dense SmolLM2
  moreau-eval --model pruned-smollm2 --tasks hellaswag --limit 200           # quick look, not the full task
"""


def _limit(text: str) -> int | float:
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit must be a number of documents or a fraction, got {text!r}") from None
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"--limit must be a positive integer or a fraction in (0, 1], got {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eval-batch-size must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--eval-batch-size must be a positive integer or 'auto', got {text!r}")
    return value


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moreau-eval", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and tasks")
    opt.add_model(g, what="the model to evaluate")
    g.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval task names; 'paper' = " + ",".join(PAPER_TASKS))
    g.add_argument("--include-path", action="append", metavar="DIR",
                   help="a directory of extra task YAMLs (lm-eval's --include_path); may be repeated")
    g.add_argument("--num-fewshot", type=_nonnegative, default=0, help="examples in the prompt (default: 0)")
    g.add_argument("--limit", type=_limit, help="at most this many documents per task (a fraction if < 1): "
                                                "for quick checks, the accuracy is then not the task's")
    g.add_argument("--allow-download", action="store_true",
                   help="let lm-eval download task datasets from the Hugging Face hub (default: offline)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-batch-size", type=_batch_size, default=8,
                   help="requests per forward pass, or 'auto' (default: 8)")
    opt.add_alias(g, "--batch-size", "--eval-batch-size", "eval_batch_size", type=_batch_size)
    opt.add_device(g)
    opt.add_dtype(g)
    opt.add_seed(g, "lm-eval's samplers")
    g = p.add_argument_group("output")
    opt.add_report(g)
    opt.add_alias(g, "--output", "--json", "json", metavar="FILE")
    opt.add_alias(g, "--report", "--json", "json", metavar="FILE")
    g.add_argument("--no-update-info", action="store_true",
                   help="do not write the results into the model directory's pruning_info.json")
    opt.add_quiet(g)
    g.add_argument("--verbose", action="store_true", help="show lm-eval's own log messages")
    return p


def run(args) -> dict:
    import torch

    from ..model.checks import check_tokenizer_fits
    from ..model.loading import load_model

    names = parse_tasks(args.tasks)
    include_paths = resolve_include_paths(args.include_path)  # bad paths fail before the model loads
    require_lm_eval()
    opt.check_device(args.device)
    opt.check_report(args.json)
    t0 = time.perf_counter()
    if not args.quiet:
        print(f"moreau-eval: loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr)
    model, tok = load_model(args.model, args.dtype, args.device)
    check_tokenizer_fits(model, tok)
    load_s = time.perf_counter() - t0
    with _progress_bars(not args.quiet):
        result = evaluate_zero_shot(model, tok, names, include_path=include_paths, num_fewshot=args.num_fewshot,
                                    batch_size=args.eval_batch_size, limit=args.limit, seed=args.seed,
                                    allow_download=args.allow_download, verbose=args.verbose)
    report = {
        "model": str(Path(args.model).resolve()) if args.model else "embedded SmolLM2-135M-Instruct",
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "device": args.device,
        **result,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "load_s": round(load_s, 2),
    }
    if args.json:
        write_json(args.json, report)
    if args.model and not args.no_update_info and Path(args.model).is_dir():
        written = write_into_pruning_info(args.model, report)
        if written is not None:
            report["pruning_info"] = str(written)
    return report


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """``--quiet``: lm-eval's tqdm bars off (tqdm reads TQDM_DISABLE), restored afterwards."""
    if enabled:
        yield
        return
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def show(report: dict) -> None:
    print(format_table(report))
    if report.get("pruning_info"):
        print(f"(written into {report['pruning_info']} under \"{ZERO_SHOT_KEY}\")")


def main(argv: Sequence[str] | None = None) -> int:
    return opt.main("moreau-eval", build_parser(), run, show, argv)


if __name__ == "__main__":
    raise SystemExit(main())
