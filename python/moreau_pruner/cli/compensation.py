"""``moreau-prune --compensate``: the options of weight compensation after structured pruning (on by
default for structured pruning, off with ``--published``), their checks and their line in the report
(the math: :mod:`moreau_pruner.prune.compensate`)."""
from __future__ import annotations

import argparse

#: what the tuning flags mean when they are not given (README "Defaults"; damping and windows chosen on a
#: held-out split of the mixed calibration text, benchmarks/results/QUALITY.md "Weight compensation")
DEFAULTS = {"compensate_mode": "weights", "compensate_damping": 0.3, "compensate_examples": 64,
            "compensate_seq_len": 128}
TUNING = ("compensate_mode", "compensate_damping", "compensate_examples", "compensate_seq_len", "compensate_calib")
#: the text compensation is fitted on when moreau-prune calibrates on its default text (pydoc): general text
DEFAULT_TEXT = "mixed"


def add_arguments(p) -> None:
    from ..prune.compensate import MODES

    g = p.add_argument_group(
        "weight compensation (--compensate)",
        "Once the units are chosen, update the weights that stay so that every pruned layer reproduces its dense "
        "output on calibration activations, layer by layer through the already pruned layers: the removed heads "
        "and MLP channels are input columns of o_proj and down_proj, and the kept columns get the damped "
        "least-squares fit W'_K = W_K + W_S G[S,K] (G[K,K] + lambda I)^-1 from the Gram matrix G of their inputs "
        "(SPEC section 11). Works with every structured method, --rounds (each round is compensated before the next "
        "scores), --uniform, global scope and --distributed fsdp; the model saves and reloads as without it. On by "
        "default for structured pruning, fitted on general text (see --compensate-calib).")
    g.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="compensate the pruned layers: on by default for structured pruning (measured better on "
                        "every model size, layer range, seed and text tried; README \"Defaults\"); --no-compensate "
                        "turns it off; --published and --unstructured leave it off")
    g.add_argument("--compensate-mode", choices=MODES, default=None,
                   help="weights: the least-squares update of the kept columns (default); bias: FLAP's bias "
                        "b' = b + W_S mean(X_S), weights unchanged; weights+bias: both fitted together. The bias "
                        "modes turn on Llama's attention_bias/mlp_bias (zero biases on q/k/v and gate/up, a few "
                        "thousand parameters); Mistral and Qwen2 cannot take them")
    g.add_argument("--compensate-damping", type=float, default=None, metavar="F",
                   help=f"lambda as a fraction of the mean diagonal of G[K,K], >= 0 (default "
                        f"{DEFAULTS['compensate_damping']}); raised tenfold, and reported, where the solve fails")
    g.add_argument("--compensate-examples", type=int, default=None, metavar="N",
                   help=f"calibration windows whose activations are fitted, drawn like the scoring batch: at most N, "
                        f"fewer when the text holds fewer (the report gives the tokens) (default "
                        f"{DEFAULTS['compensate_examples']}); 0: the scoring batch itself")
    g.add_argument("--compensate-seq-len", type=int, default=None, metavar="T",
                   help=f"tokens per compensation window (default {DEFAULTS['compensate_seq_len']})")
    g.add_argument("--compensate-calib", default=None, metavar="SOURCE",
                   help=f"the text the compensation windows come from (its calibration side): pydoc, fortunes, "
                        f"mixed or a text file. Default: {DEFAULT_TEXT} (the calibration sides of pydoc and fortunes) "
                        f"when --calib is the default pydoc and no --calib-file is given, so the fit is not to one "
                        f"narrow text (pydoc alone when Debian's fortunes is not installed); otherwise the "
                        f"calibration text itself")


def _default_text(args) -> str | None:
    """The compensation text when --compensate-calib is not given (None: the calibration text)."""
    from .. import data

    if args.calib_file or args.calib != "pydoc":
        return None
    return DEFAULT_TEXT if data.corpus_available("fortunes") else None


def check_args(args):
    """(the CompensateConfig, its own windows (at most examples, seq_len) or None for the scoring batch,
    the text of those windows or None for the calibration text) of the options; (None, None, None) when
    compensation is off: by --no-compensate, or by default with --published or --unstructured. A
    ValueError names the problem; run before any work. Fills the unset tuning options with
    :data:`DEFAULTS`."""
    from ..prune.compensate import CompensateConfig

    given = [f"--{name.replace('_', '-')}" for name in TUNING if getattr(args, name, None) is not None]
    on = args.compensate
    if on is None:
        on = not (args.unstructured or getattr(args, "published", False))
        if not on and given:
            why = "--unstructured" if args.unstructured else "--published"
            raise ValueError(f"{', '.join(given)} tune weight compensation, which {why} leaves off: add --compensate")
    if not on:
        if given:
            raise ValueError(f"{', '.join(given)} tune weight compensation, which --no-compensate turns off: "
                             "drop one of them")
        return None, None, None
    if args.unstructured:
        raise ValueError("--compensate updates the weights that stay after heads and MLP channels are removed "
                         "(structural pruning); --unstructured zeroes single weights: drop one of them")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.compensate_examples < 0:
        raise ValueError(f"--compensate-examples must be >= 0 (0: the scoring batch), got {args.compensate_examples}")
    if args.compensate_seq_len < 2:
        raise ValueError(f"--compensate-seq-len must be >= 2, got {args.compensate_seq_len}")
    source = args.compensate_calib
    if source is not None:
        if not args.compensate_examples:
            raise ValueError("--compensate-calib gives the compensation windows their own text; "
                             "--compensate-examples 0 fits the scoring batch instead: drop one of them")
        _check_source(source)
    elif args.compensate_examples:
        source = _default_text(args)
    cfg = CompensateConfig(mode=args.compensate_mode, damping=args.compensate_damping,
                           micro_batch_size=args.micro_batch_size).validate()
    return cfg, ((args.compensate_examples, args.compensate_seq_len) if args.compensate_examples else None), source


def _check_source(source: str) -> None:
    """--compensate-calib names a corpus or a readable text file (a ValueError otherwise)."""
    import os

    from .. import data

    if source in data.CORPORA:
        if not data.corpus_available(source):
            raise ValueError(f"--compensate-calib {source}: the corpus is not installed here (Debian's fortunes: "
                             "apt-get install fortunes); use pydoc or a text file")
        return
    if not os.path.isfile(source):
        raise ValueError(f"--compensate-calib {source!r}: neither a corpus ({', '.join(data.CORPORA)}) nor a file")


def describe(comp: dict) -> str:
    """The report's compensation line."""
    rows = comp["layers"]
    damp = f"damping {comp['damping']:g}" + (f" (raised to {comp['max_damping_used']:g} somewhere)"
                                             if comp["max_damping_used"] > comp["damping"] else "")
    errs = ("" if not rows else f"; calibration error {comp['error_before_mean']:.4f} -> {comp['error_after_mean']:.4f} "
            f"(mean over {len(rows)} linears)")
    bias = f"; bias switched on: {', '.join(comp['bias_switches'])}" if comp.get("bias_switches") else ""
    text = f" of {comp['text']}" if comp.get("text") else ""
    return f"{comp['mode']}, {damp}, {comp['tokens']:,} tokens{text}{errs}{bias}"
