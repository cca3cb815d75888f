"""``moreau-recover``: the command line of the recovery stage."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .checkpoints import prepare_out
from .config import RecoverConfig
from .dataset import load_recovery_data
from .lora import MissingExtraError, peft_module, read_adapter_dir
from .loop import ADAPTER_DIR, REPORT_FILE, recover

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Recover a pruned model's quality with a short LoRA fine-tune (LLM-Pruner / MoreauPruner's recovery
stage), then merge the adapter and save the model in the same reloadable format.

LoRA (peft) goes on q/k/v/o and gate/up/down of every layer, whatever each layer's pruned width.
Defaults: rank 8, alpha 16, dropout 0.05, AdamW lr 1e-4, 2 epochs, sequences cut off at 256 tokens,
bfloat16 on a GPU and float32 on a CPU. Held-out perplexity is measured before and after.

--data takes a corpus name (pydoc, fortunes: their calibration side; the held-out side is never
trained on), a .txt file, a .jsonl/.json file of {"text": ...} rows, or Alpaca-style
{"instruction", "input", "output"} rows (LLM-Pruner's prompt; loss on the response only).

OUT receives the merged model (moreau_pruner.load_pruned(OUT) or
AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)), OUT/adapter (the LoRA adapter
alone, peft format) and OUT/recovery.json (losses, perplexity before/after, steps, time). While the
run goes, checkpoints land in OUT/checkpoints; run the same command again to continue a killed run."""

EPILOG = """\
examples:
  moreau-recover --model pruned-smollm2 --data pydoc --out recovered --max-steps 300
  moreau-recover --model pruned-llama --data alpaca_data_cleaned.json --out llama-rec --device cuda
  moreau-recover --model pruned --data notes.jsonl --out rec --rank 16 --alpha 32 --epochs 1
  moreau-recover --model pruned --data pydoc --out rec --resume          # continue a killed run
  moreau-recover --model pruned --adapter rec/adapter --data pydoc --out merged --max-steps 0
"""


def build_parser() -> argparse.ArgumentParser:
    d = RecoverConfig()
    p = argparse.ArgumentParser(prog="moreau-recover", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input and output")
    g.add_argument("--model", required=True, help="a pruned directory (moreau-prune --out), a local HF model "
                                                  "directory or a .gguf file")
    g.add_argument("--data", required=True, help="pydoc, fortunes, or a .txt / .jsonl / .json file")
    g.add_argument("--out", required=True, help="output directory (merged model, adapter/, recovery.json)")
    g.add_argument("--adapter", metavar="DIR", help="start from this peft LoRA adapter (its rank/alpha/targets "
                                                    "apply); with --max-steps 0 it is only merged")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT, ignoring its checkpoints")
    g.add_argument("--resume", action="store_true", help="require a checkpoint in OUT/checkpoints and continue "
                                                         "from it (without this flag a checkpoint is resumed "
                                                         "automatically when there is one)")
    g = p.add_argument_group("LoRA and training")
    g.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    g.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    g.add_argument("--dropout", type=float, default=d.dropout, help=f"LoRA dropout (default {d.dropout})")
    g.add_argument("--target-modules", default=",".join(d.target_modules),
                   help="comma-separated module names to adapt (default: all seven projections)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run (replaces --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"examples per optimizer step (default {d.batch_size})")
    g.add_argument("--micro-batch-size", type=int, help="examples per forward/backward (default: --batch-size)")
    g.add_argument("--cutoff-len", type=int, default=d.cutoff_len,
                   help=f"tokens per example; text is cut into blocks of this length (default {d.cutoff_len})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"gradient clipping norm, 0 = none (default {d.max_grad_norm})")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of LoRA init, data order and dropout")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"write a checkpoint every N steps (default {d.save_every})")
    g.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="training dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    g = p.add_argument_group("held-out perplexity")
    g.add_argument("--eval-data", help="text source whose held-out side is scored (default: the --data source's "
                                       "own held-out side; pydoc for instruction data)")
    g.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len, help="tokens per window (default 128)")
    g.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help=f"windows scored, 0 = no evaluation, -1 = all of the held-out text (default {d.eval_windows})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = RecoverConfig(
        rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        save_every=args.save_every, eval_seq_len=args.eval_seq_len,
        eval_windows=None if args.eval_windows == -1 else args.eval_windows, device=args.device, dtype=args.dtype,
    )
    try:
        cfg.validate()
        peft_module()
        out = Path(args.out).expanduser().absolute()
        prepare_out(out, args.overwrite, "always" if args.resume else "auto")
        if args.adapter is not None:
            read_adapter_dir(Path(args.adapter))
        from ..model.loading import load_model

        model, tokenizer = load_model(args.model, dtype=cfg.resolved_dtype(), device=cfg.device)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; recovery needs one to read the data")
        data = load_recovery_data(args.data, tokenizer, cfg.cutoff_len, eval_source=args.eval_data)
        info = {}
        src_info = Path(args.model) / "pruning_info.json"
        if src_info.is_file():
            try:
                info = json.loads(src_info.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                info = {}
        info = info if isinstance(info, dict) else {"pruning_info": info}
        info["recovered_from"] = os.fspath(Path(args.model).expanduser().absolute())
        if not args.quiet:
            print(f"recovery data: {data.source} ({data.kind}, {len(data.examples)} examples, "
                  f"{data.skipped} rows skipped); held-out text: {data.heldout_source}", file=sys.stderr)
        result = recover(model, tokenizer, data, cfg, out=out, adapter=args.adapter,
                         resume="always" if args.resume else "auto", overwrite=args.overwrite,
                         progress=not args.quiet, extra_info=info)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            MissingExtraError) as exc:
        print(f"moreau-recover: error: {exc}", file=sys.stderr)
        return 2
    r = result.report

    def fmt(p):
        return "n/a" if p is None else f"{p['ppl']:.3f}"

    print(f"steps {r['steps']}  loss {r['losses'][0] if r['losses'] else float('nan'):.4f} -> "
          f"{r['losses'][-1] if r['losses'] else float('nan'):.4f}  held-out ppl {fmt(r['ppl_before'])} -> "
          f"{fmt(r['ppl_after'])}  ({r['total_time_s']:.1f} s)")
    print(f"saved {result.out} (adapter in {result.out / ADAPTER_DIR}, report {result.out / REPORT_FILE})")
    return 0

