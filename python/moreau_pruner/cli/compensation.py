"""``moreau-prune --compensate``: the options of weight compensation after structured pruning, their
checks and their line in the report (the math: :mod:`moreau_pruner.prune.compensate`)."""
from __future__ import annotations

#: what the tuning flags mean when --compensate is given without them (see README "Defaults")
DEFAULTS = {"compensate_mode": "weights", "compensate_damping": 0.1, "compensate_examples": 64,
            "compensate_seq_len": 128}
TUNING = ("compensate_mode", "compensate_damping", "compensate_examples", "compensate_seq_len")


def add_arguments(p) -> None:
    from ..prune.compensate import MODES

    g = p.add_argument_group(
        "weight compensation (--compensate)",
        "Once the units are chosen, update the weights that stay so that every pruned layer reproduces its dense "
        "output on calibration activations, layer by layer through the already pruned layers: the removed heads "
        "and MLP channels are input columns of o_proj and down_proj, and the kept columns get the damped "
        "least-squares fit W'_K = W_K + W_S G[S,K] (G[K,K] + lambda I)^-1 from the Gram matrix G of their inputs "
        "(SPEC section 11). Works with every structured method, --rounds (each round is compensated before the next "
        "scores), --uniform, global scope and --distributed fsdp; the model saves and reloads as without it.")
    g.add_argument("--compensate", action="store_true",
                   help="compensate the pruned layers (not with --unstructured; --published leaves it off)")
    g.add_argument("--compensate-mode", choices=MODES, default=None,
                   help="weights: the least-squares update of the kept columns (default); bias: FLAP's bias "
                        "b' = b + W_S mean(X_S), weights unchanged; weights+bias: both fitted together. The bias "
                        "modes turn on Llama's attention_bias/mlp_bias (zero biases on q/k/v and gate/up, a few "
                        "thousand parameters); Mistral and Qwen2 cannot take them")
    g.add_argument("--compensate-damping", type=float, default=None, metavar="F",
                   help=f"lambda as a fraction of the mean diagonal of G[K,K], >= 0 (default "
                        f"{DEFAULTS['compensate_damping']}); raised tenfold, and reported, where the solve fails")
    g.add_argument("--compensate-examples", type=int, default=None, metavar="N",
                   help=f"calibration windows whose activations are fitted, drawn from the calibration text like "
                        f"the scoring batch (default {DEFAULTS['compensate_examples']}); 0: the scoring batch itself")
    g.add_argument("--compensate-seq-len", type=int, default=None, metavar="T",
                   help=f"tokens per compensation window (default {DEFAULTS['compensate_seq_len']})")


def check_args(args):
    """(the CompensateConfig, its own windows (examples, seq_len) or None for the scoring batch) of the
    options, (None, None) without --compensate, or a ValueError naming the problem; run before any
    work. Fills the unset tuning options with :data:`DEFAULTS`."""
    from ..prune.compensate import CompensateConfig

    given = [f"--{name.replace('_', '-')}" for name in TUNING if getattr(args, name, None) is not None]
    if not args.compensate:
        if given:
            raise ValueError(f"{', '.join(given)} tune weight compensation: add --compensate")
        return None, None
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
    cfg = CompensateConfig(mode=args.compensate_mode, damping=args.compensate_damping,
                           micro_batch_size=args.micro_batch_size).validate()
    return cfg, ((args.compensate_examples, args.compensate_seq_len) if args.compensate_examples else None)


def describe(comp: dict) -> str:
    """The report's compensation line."""
    rows = comp["layers"]
    damp = f"damping {comp['damping']:g}" + (f" (raised to {comp['max_damping_used']:g} somewhere)"
                                             if comp["max_damping_used"] > comp["damping"] else "")
    errs = ("" if not rows else f"; calibration error {comp['error_before_mean']:.4f} -> {comp['error_after_mean']:.4f} "
            f"(mean over {len(rows)} linears)")
    bias = f"; bias switched on: {', '.join(comp['bias_switches'])}" if comp.get("bias_switches") else ""
    return f"{comp['mode']}, {damp}, {comp['tokens']:,} tokens{errs}{bias}"
