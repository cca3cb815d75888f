"""``moreau-recover``: the command line of the recovery stage."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ..io.atomic import write_json
from ..io.target import check_space, model_bytes
from ..recover.checkpoints import CHECKPOINTS_DIR, prepare_out
from ..recover.config import GENERATE_FIELDS, LR_SCHEDULES, TUNINGS, RecoverConfig
from ..recover.dataset import load_recovery_data
from ..recover.generate import GENERATED
from ..recover.lora import peft_module, read_adapter_dir
from ..recover.loop import ADAPTER_DIR, REPORT_FILE, recover
from ..recover.teacher import check_teacher, load_teacher, resolve_teacher
from . import options as opt

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Recover a pruned model's quality with a short LoRA fine-tune (LLM-Pruner / MoreauPruner's recovery
stage), then merge the adapter and save the model in the same reloadable format.
--distill learns from the dense model instead of the text alone, --tuning full trains every weight.

LoRA (peft) goes on q/k/v/o and gate/up/down of every layer, whatever each layer's pruned width.
Defaults: rank 8, alpha 16, dropout 0.05, AdamW lr 1e-4, 2 epochs, sequences cut off at 256 tokens,
bfloat16 on a GPU and float32 on a CPU. Held-out perplexity is measured before and after.

--distill: the dense model (by default the one MODEL/pruning_info.json names, as moreau-prune
writes it; else --teacher) is loaded once, frozen, and the loss becomes the KL divergence from its
next-token distribution to the pruned model's, KL(teacher || student) at temperature T times T²
(optionally mixed with the LM loss, --lm-weight; optionally on the teacher's top-k tokens). The
forward direction makes the student cover all the teacher's continuations, which is what perplexity
on any text rewards. The teacher's perplexity and the out-of-domain perplexity (--ood-data,
fortunes by default with --distill) are measured too, so recovered general quality and adaptation
to the recovery text are told apart.

--data takes a corpus name (pydoc, fortunes: their calibration side; the held-out side is never
trained on), a .txt file, a .jsonl/.json file of {"text": ...} rows, or Alpaca-style
{"instruction", "input", "output"} rows (LLM-Pruner's prompt; loss on the response only).

--data generated (with --distill) trains on text the teacher writes itself (data-free distillation,
as LLM-QAT does): text from one corpus only moves the student toward the teacher on that kind of
text, while the teacher's own samples cover its general distribution. The teacher samples
--generate-samples sequences of --cutoff-len tokens from its start token at --generate-temperature,
seeded by --seed; the last fifth of them is held out and scored as the in-domain text. The samples
are kept in OUT/checkpoints, so a resumed run trains on exactly the same tokens.

OUT receives the trained model (moreau_pruner.load_pruned(OUT), which runs no code from the
directory), OUT/adapter (the LoRA adapter
alone, peft format; not with --tuning full) and OUT/recovery.json (losses, perplexity before/after, steps, time). While the
run goes, checkpoints land in OUT/checkpoints; run the same command again to continue a killed run."""

EPILOG = """\
examples:
  moreau-recover --model pruned-smollm2 --data pydoc --out recovered --max-steps 300
  moreau-recover --model pruned-llama --data alpaca_data_cleaned.json --out llama-rec --device cuda
  moreau-recover --model pruned --data notes.jsonl --out rec --rank 16 --alpha 32 --epochs 1
  moreau-recover --model pruned --data pydoc --out rec --resume          # continue a killed run
  moreau-recover --model pruned --adapter rec/adapter --data pydoc --out merged --max-steps 0
  moreau-recover --model pruned --data pydoc --out rec --distill --max-steps 300    # teacher from pruning_info.json
  moreau-recover --model pruned --data pydoc --out rec --distill --tuning full --lr 2e-5 --teacher dense-dir
  moreau-recover --model pruned --data alpaca.json --out rec --distill --lm-weight 0.5 --device cuda
  moreau-recover --model pruned --data generated --distill --tuning full --lr 2e-4 --out rec \
      --generate-samples 512 --lr-schedule cosine --ood-data fortunes,pydoc   # the teacher writes the text
"""


def build_parser() -> argparse.ArgumentParser:
    d = RecoverConfig()
    p = argparse.ArgumentParser(prog="moreau-recover", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input and output")
    opt.add_model(g, required=True, what="the model to recover")
    g.add_argument("--data", required=True, help="pydoc, fortunes, a .txt / .jsonl / .json file, or generated (text "
                                                 "sampled from the teacher; needs --distill)")
    opt.add_output(g, "output directory (merged model, adapter/, recovery.json)", required=True,
                   overwrite="replace an existing OUT, ignoring its checkpoints")
    opt.add_report(g, " (a copy of OUT/recovery.json)")
    g.add_argument("--adapter", metavar="DIR", help="start from this peft LoRA adapter (its rank/alpha/targets "
                                                    "apply); with --max-steps 0 it is only merged")
    g.add_argument("--resume", action="store_true", help="require a checkpoint in OUT/checkpoints and continue "
                                                         "from it (without this flag a checkpoint is resumed "
                                                         "automatically when there is one)")
    g = p.add_argument_group("LoRA and training")
    g.add_argument("--tuning", choices=TUNINGS, default=d.tuning,
                   help="what is trained: lora (adapters, merged at the end; default) or full (every weight of the "
                        "pruned model; with a 16-bit --dtype the weights stay float32 under autocast)")
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
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="the learning rate after the warm-up: constant (default) or cosine, a half cosine from --lr "
                        "down to --min-lr at the last step (a cosine run resumes only to the same --max-steps)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="where the cosine ends (default 0)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"gradient clipping norm, 0 = none (default {d.max_grad_norm})")
    opt.add_seed(g, "the LoRA init, the data order and dropout")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"write a checkpoint every N steps (default {d.save_every})")
    opt.add_device(g, default=d.device)
    opt.add_dtype(g, default=None, what="training dtype")
    g = p.add_argument_group("distillation from the dense model")
    g.add_argument("--distill", action="store_true",
                   help="loss = KL(teacher || student) at --distill-temperature, times its square (mixed with the "
                        "LM loss by --lm-weight)")
    g.add_argument("--teacher", metavar="PATH", help="the dense model: a model directory, a .gguf file or 'embedded' "
                                                     "(default: the model MODEL/pruning_info.json names)")
    g.add_argument("--teacher-dtype", choices=["float32", "bfloat16", "float16"],
                   help="the teacher's dtype, never wider than the training dtype (default: the training dtype)")
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature, metavar="T",
                   help=f"softmax temperature of both distributions; the KL is multiplied by T² "
                        f"(default {d.distill_temperature:g})")
    g.add_argument("--distill-top-k", type=int, metavar="K",
                   help="compare the teacher's K most likely tokens plus one bin for the rest (default: every token)")
    g.add_argument("--lm-weight", type=float, default=d.lm_weight, metavar="W",
                   help=f"loss = (1 - W) * T² * KL + W * LM loss, W in [0, 1) (default {d.lm_weight:g})")
    g = p.add_argument_group("teacher-generated recovery text (--data generated)")
    g.add_argument("--generate-samples", type=int, default=d.generate_samples, metavar="N",
                   help=f"sequences of --cutoff-len tokens the teacher samples; a fifth is held out for the "
                        f"in-domain perplexity (default {d.generate_samples}; training uses --max-steps x "
                        f"--batch-size of them, repeating them in new orders beyond that)")
    g.add_argument("--generate-temperature", type=float, default=d.generate_temperature, metavar="T",
                   help=f"sampling temperature: 1 samples the teacher's own distribution, lower is more "
                        f"repetitive text (default {d.generate_temperature:g})")
    g.add_argument("--generate-batch-size", type=int, default=d.generate_batch_size, metavar="B",
                   help=f"sequences sampled at a time (default {d.generate_batch_size}; part of what fixes the "
                        "samples, with --seed)")
    g = p.add_argument_group("held-out perplexity")
    g.add_argument("--eval-data", help="text source whose held-out side is scored (default: the --data source's "
                                       "own held-out side; pydoc for instruction data)")
    g.add_argument("--eval-seq-lens", type=_one_length, default=d.eval_seq_len, dest="eval_seq_len", metavar="N",
                   help=f"tokens per window (one length; default {d.eval_seq_len})")
    opt.add_alias(g, "--eval-seq-len", "--eval-seq-lens", "eval_seq_len", type=_one_length)
    g.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help=f"windows scored, 0 = no evaluation, -1 = all of the held-out text (default {d.eval_windows})")
    g.add_argument("--ood-data", metavar="SOURCE",
                   help="other text whose held-out side is scored as the out-of-domain perplexity: a corpus name or "
                        "a text file, several separated by commas (the first is the report's out-of-domain text, "
                        "the others go to its more_ood entry), or none (default: none; with --distill fortunes, or "
                        "pydoc when --data is fortunes)")
    opt.add_quiet(p)
    return p


def _one_length(text: str) -> int:
    lens = opt.parse_eval_lens(text)
    if len(lens) != 1:
        raise argparse.ArgumentTypeError(f"moreau-recover scores one window length, got {text!r}")
    return lens[0]


def _ood_source(args) -> str | list[str] | None:
    """--ood-data (several: a list), or its default: none, except fortunes (pydoc when training on fortunes)
    with --distill."""
    if args.ood_data is not None:
        if args.ood_data == "none":
            return None
        sources = [s.strip() for s in args.ood_data.split(",") if s.strip()]
        if not sources:
            raise ValueError(f"--ood-data {args.ood_data!r} names no text")
        return sources[0] if len(sources) == 1 else sources
    if not args.distill:
        return None
    return "pydoc" if args.data == "fortunes" else "fortunes"


def _source_info(model_dir: str) -> dict:
    """The pruned directory's pruning_info.json (what it was pruned from and how), plus where it is."""
    info = {}
    src_info = Path(model_dir) / "pruning_info.json"
    if src_info.is_file():
        try:
            info = json.loads(src_info.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            info = {}
    info = info if isinstance(info, dict) else {"pruning_info": info}
    info["recovered_from"] = os.fspath(Path(model_dir).expanduser().absolute())
    return info


def run(args):
    """The recovery run of parsed arguments; returns the :class:`~moreau_pruner.recover.loop.RecoverResult`."""
    cfg = RecoverConfig(
        rank=args.rank, alpha=args.alpha, dropout=args.dropout,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, cutoff_len=args.cutoff_len, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        save_every=args.save_every, eval_seq_len=args.eval_seq_len,
        eval_windows=None if args.eval_windows == -1 else args.eval_windows, device=args.device, dtype=args.dtype,
        tuning=args.tuning, distill=args.distill, distill_temperature=args.distill_temperature,
        distill_top_k=args.distill_top_k, lm_weight=args.lm_weight, teacher_dtype=args.teacher_dtype,
        lr_schedule=args.lr_schedule, min_lr=args.min_lr, generate_samples=args.generate_samples,
        generate_temperature=args.generate_temperature, generate_batch_size=args.generate_batch_size,
    )
    generated = args.data == GENERATED
    if generated and not args.distill:
        raise ValueError(f"--data {GENERATED} is text the dense teacher samples: add --distill (and --teacher PATH "
                         "unless MODEL/pruning_info.json names the dense model)")
    if not generated:
        changed = [f"--{k.replace('_', '-')}" for k in GENERATE_FIELDS if getattr(cfg, k) != getattr(RecoverConfig(), k)]
        if changed:
            raise ValueError(f"{', '.join(changed)} only apply to --data {GENERATED}")
    cfg.validate()
    ood = _ood_source(args)
    opt.check_device(cfg.device)
    opt.check_report(args.json)
    if args.teacher is not None and not args.distill:
        raise ValueError("--teacher is the dense model of distillation: add --distill")
    if cfg.tuning == "lora":
        peft_module()
    opt.check_out_target(args.out, args.overwrite, args.model)
    out = Path(args.out).expanduser().absolute()
    prepare_out(out, args.overwrite, "always" if args.resume else "auto")
    if args.adapter is not None:
        if cfg.tuning != "lora":
            raise ValueError("--adapter starts LoRA tuning from a saved adapter; it does not apply to --tuning "
                             "full (merge it first with --adapter DIR --max-steps 0)")
        read_adapter_dir(Path(args.adapter))
    teacher_spec = resolve_teacher(args.model, args.teacher) if cfg.distill else None
    from ..model.loading import load_model

    model, tokenizer = load_model(args.model, dtype=cfg.resolved_dtype(), device=cfg.device)
    check_space(out, model_bytes(model))  # the merged model fits, before the training
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; recovery needs one to read the data")
    if not generated:
        data = load_recovery_data(args.data, tokenizer, cfg.cutoff_len, eval_source=args.eval_data,
                                  ood_source=ood)
    teacher = None
    if teacher_spec is not None:
        if not args.quiet:
            print(f"teacher: {teacher_spec}", file=sys.stderr)
        teacher = load_teacher(teacher_spec, cfg.resolved_teacher_dtype(), cfg.device)
        check_teacher(teacher, model, tokenizer)
    if generated:  # (samples stored by a killed run with the same settings are taken again)
        data = load_recovery_data(GENERATED, tokenizer, cfg.cutoff_len, eval_source=args.eval_data,
                                  ood_source=ood, teacher=teacher,
                                  generation=cfg.generation(teacher.source),
                                  reuse_dir=None if args.overwrite else out / CHECKPOINTS_DIR,
                                  progress=not args.quiet)
    if not args.quiet:
        print(f"recovery data: {data.source} ({data.kind}, {len(data.examples)} examples, "
              f"{data.skipped} rows skipped); held-out text: {data.heldout_source}"
              + (f"; out-of-domain text: {data.ood_source}" if data.ood_source else ""), file=sys.stderr)
    result = recover(model, tokenizer, data, cfg, out=out, adapter=args.adapter,
                     resume="always" if args.resume else "auto", overwrite=args.overwrite,
                     progress=not args.quiet, extra_info=_source_info(args.model), teacher=teacher,
                     report_path=args.json)
    if args.json:
        write_json(args.json, result.report)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return opt.main("moreau-recover", build_parser(), run, _print_summary, argv)


def _print_summary(result) -> None:
    r = result.report

    def fmt(p):
        return "n/a" if p is None else f"{p['ppl']:.3f}"

    print(f"steps {r['steps']}  loss {r['losses'][0] if r['losses'] else float('nan'):.4f} -> "
          f"{r['losses'][-1] if r['losses'] else float('nan'):.4f}  held-out ppl {fmt(r['ppl_before'])} -> "
          f"{fmt(r['ppl_after'])}  ({r['total_time_s']:.1f} s)")
    if "ppl_ood_after" in r:
        print(f"out-of-domain ({r['data']['ood_source']}) ppl {fmt(r['ppl_ood_before'])} -> {fmt(r['ppl_ood_after'])}")
    for source, m in r.get("more_ood", {}).items():
        print(f"out-of-domain ({source}) ppl {fmt(m['ppl_before'])} -> {fmt(m['ppl_after'])}")
    if "teacher" in r:
        t = r["teacher"]
        print(f"teacher {t['source']}: held-out ppl {fmt(t['ppl'])}, out-of-domain ppl {fmt(t['ppl_ood'])}")
    side = f"adapter in {result.out / ADAPTER_DIR}, " if (result.out / ADAPTER_DIR).is_dir() else ""
    print(f"saved {result.out} ({side}report {result.out / REPORT_FILE})")


if __name__ == "__main__":
    raise SystemExit(main())
