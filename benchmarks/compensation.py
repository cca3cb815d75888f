#!/usr/bin/env python
"""Weight compensation after structured pruning (SPEC §11, :mod:`moreau_pruner.prune.compensate`) against
the same pruning without it (BENCHMARKS.md §3). One JSON record per cell in
``benchmarks/results/compensation/<model-tag>/records.jsonl``; a rerun skips finished cells;
``python benchmarks/render_quality.py`` renders them into QUALITY.md.

Two kinds of cells:

* ``tune``: the compensation's damping, calibration token count and mode, chosen on the
  calibration side only. The calibration documents of the ``--calib`` corpus (``mixed``: both
  corpora's calibration sides, :func:`moreau_pruner.data.split_corpus`) are split again (the same
  document-level rule, 20 %) into a *fit* part and a *validation* part. Units are scored (Taylor,
  10 x 64 tokens) and compensated on windows of the fit part; the cell records the perplexity on the
  validation part (``calib-val``) and on the compensation windows themselves (``fit``), so the gap
  between the two shows whether the fit to a few hundred tokens carries beyond them. The
  evaluation text is not read.
* ``cell``: a method's units (scored on the usual 10 x 64-token calibration batch of seed s drawn
  from the calibration side of ``--score-calib``, pydoc by default, every layer, cached in
  ``--scores-cache``; the policy-gradient mask is cached too) at a size given as
  the fraction of the decoder blocks' parameters removed (``--sizes``; the local ratio that reaches
  it is solved per layer range with ``ratio_for_params``), pruned without compensation (``none``)
  and with each ``--modes`` entry at ``--damping`` on ``--examples`` x ``--seq-len`` calibration
  tokens (seed s) of the ``--calib`` corpus's calibration side. With the default ``--score-calib
  pydoc`` the ``none`` cell does not depend on ``--calib``, so its record is shared (its key names
  no corpus); ``--calib mixed`` fits the compensation to pydoc and fortunes text alike while the
  units stay those of the pydoc scores, which isolates the effect of the fit's text. Perplexity on the first ``--windows`` 128-token windows of the held-out pydoc and
  fortunes texts.

Cost: wall seconds of the scoring, the compensation and the evaluation on this machine (with the
load average), and FLOPs: the compensation's two passes of every compensated layer over its tokens
plus the Gram matrices, against the importance's forward+backward passes (``flops``), so a GPU
time can be estimated as FLOPs / sustained throughput (``--gpu-tflops``).

    python benchmarks/compensation.py tune --examples 0,16,64 --dampings 0.001,0.01,0.1,1
    python benchmarks/compensation.py cell --methods taylor --sizes 0.2 --layers 4:30,0:30 --seeds 0
    python benchmarks/compensation.py tune --calib mixed --examples 16,64,128 --dampings 0.01,0.1,0.3,1
    python benchmarks/compensation.py cell --calib mixed --damping 0.1 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (_git_commit, append_record, evaluate, host_details, kept_units, load, log,  # noqa: E402
                     machine_description, read_records)

from moreau_pruner import MoreauConfig, PruneConfig, compute_scores, discover, prune_model, prune_structure  # noqa: E402
from moreau_pruner import data as mp_data  # noqa: E402
from moreau_pruner.prune.compensate import MODES, CompensateConfig, compensator  # noqa: E402
from moreau_pruner.prune.plan import count_parameters, ratio_for_params  # noqa: E402
from moreau_pruner.prune.policy import PolicyConfig  # noqa: E402
from moreau_pruner.score.importance import LayerScores  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "compensation"
#: benchmark method -> (library method, its options)
METHODS = {"taylor": ("taylor", {}), "taylor-second": ("taylor", {"taylor_variant": "param_second"}),
           "moreau-paper": ("moreau", {}), "magnitude": ("magnitude", {}), "random": ("random", {}),
           "pg-taylor": ("policy-gradient", {})}
TEXTS = ("pydoc", "fortunes")


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def _corpus_tag(corpus: str) -> str:
    """The key and cache-name suffix of a calibration corpus: empty for pydoc, so that the records and
    score caches made before the corpus was an option keep their names."""
    return "" if corpus == "pydoc" else f"|calib-{corpus}"


# ----------------------------------------------------------------------------- pieces
def layer_params(ls) -> int:
    """The parameters of a decoder layer's attention and MLP projections."""
    return sum(p.numel() for p in ls.attention_params() + ls.mlp_params())


def block_params(structure) -> int:
    return sum(layer_params(ls) for ls in structure.layers)


def layer_flops(structure, index: int, tokens: int) -> float:
    """2 x parameters x tokens: one forward of decoder layer ``index`` (attention scores left out)."""
    return 2.0 * layer_params(structure.layers[index]) * tokens


def compensation_flops(structure, report: dict | None, tokens: int) -> float:
    """Two passes of every compensated layer over its tokens, plus the Gram matrices (2·in²·tokens per linear)
    and the solves (Cholesky K³/3, the update 2·out·K·|S|, three error sums 2·out·in²)."""
    if not report or not report["layers"]:
        return 0.0
    layers = sorted({r["layer"] for r in report["layers"]})
    total = sum(2 * layer_flops(structure, i, tokens) for i in layers)
    hidden = structure.hidden_size
    for r in report["layers"]:
        cols = r["kept"] + r["removed"]
        total += 2.0 * cols * cols * tokens + r["kept"] ** 3 / 3 + 2.0 * hidden * r["kept"] * r["removed"] \
            + 6.0 * hidden * cols * cols
    return total


def scoring_flops(method: str, params: int, tokens: int, iters: int = 10) -> float:
    """Forward+backward (3 x 2 x parameters x tokens) per gradient: once (Taylor), ``iters`` times (Moreau)."""
    passes = {"taylor": 1, "taylor-second": 2, "moreau-paper": iters, "pg-taylor": 1}.get(method, 0)
    return 6.0 * params * tokens * passes


class Bench:
    """The loaded model, its texts and the caches of one invocation."""

    def __init__(self, args):
        torch.set_num_threads(args.threads or torch.get_num_threads())
        t0 = time.perf_counter()
        self.loaded = load(args.model, "cpu")
        self.load_s = time.perf_counter() - t0
        self.args = args
        self.dense = self.loaded.model
        self.structure = discover(self.dense)
        self.total = count_parameters(self.dense)
        self.blocks = block_params(self.structure)
        self.path = Path(args.out) / self.loaded.tag / "records.jsonl"
        self.done = {r["key"] for r in read_records(self.path)}
        self.ids = {}

    def tokens(self, name: str, corpus: str | None = None) -> torch.Tensor:
        """Token ids of 'calib', 'fit', 'val' (the calibration side of ``corpus``, default ``--calib``, and
        its split) or '<corpus>-heldout'."""
        corpus = corpus or self.args.calib
        if (name, corpus) not in self.ids:
            if name in ("fit", "val"):
                docs = mp_data.split_corpus(corpus)[0]
                fit, val = mp_data.split_documents(docs)
                text = "\n\n".join(fit if name == "fit" else val)
            elif name == "calib":
                text = mp_data.calibration_text(corpus)
            else:
                text = mp_data.heldout_text(name.removesuffix("-heldout"))
            self.ids[(name, corpus)] = self.loaded.tokenize(text)
        return self.ids[(name, corpus)]

    def ratio(self, size: float, layers: str) -> tuple[float, int]:
        target = self.total - int(round(size * self.blocks))
        return ratio_for_params(self.structure, target, self.prune_config(0.5, layers)), target

    def prune_config(self, ratio, layers):
        return PruneConfig(ratio=ratio, attn_layers=layers, mlp_layers=layers, granularity="query-heads")

    def scores(self, method: str, seed: int, source: str, corpus: str) -> tuple[list, float, dict | None]:
        """(unit scores of every layer, seconds, policy mask or None) for ``method`` on the 10 x 64 batch of
        seed ``seed`` from ``source`` ('calib' or 'fit') of ``corpus``; cached on disk. Policy gradient: the learned keep-probabilities and
        per-layer removal counts of its final mask (its budget depends on the size and layers, in the key)."""
        lib, opts = METHODS[method]
        name = f"{method}_s{seed}_{source}{_corpus_tag(corpus).replace('|', '_')}_{self.loaded.tag}.pt"
        disk = Path(self.args.scores_cache) / name
        if disk.is_file():
            saved = torch.load(disk)
            return [LayerScores(*x) for x in saved["scores"]], saved["seconds"], saved.get("policy")
        batch = mp_data.calibration_batch(None, self.tokens(source, corpus), 10, 64, seed)
        every = self.prune_config(0.5, f"0:{self.structure.num_layers}")
        t0 = time.perf_counter()
        scores, _, _ = compute_scores(self.dense, batch, lib, every, MoreauConfig(mode="paper", seed=seed), seed=seed,
                                      progress=False, **opts)
        seconds = time.perf_counter() - t0
        self._save(disk, scores, seconds, None)
        return scores, seconds, None

    def policy_mask(self, seed: int, ratio: float, layers: str, corpus: str):
        """The pg-taylor mask at this ratio and layer range, searched on ``corpus``: (probabilities as LayerScores,
        counts, seconds)."""
        disk = Path(self.args.scores_cache) / (f"pg-taylor_s{seed}_r{ratio:g}_{layers.replace(':', '-')}"
                                               f"{_corpus_tag(corpus).replace('|', '_')}_{self.loaded.tag}.pt")
        if disk.is_file():
            saved = torch.load(disk)
            return [LayerScores(*x) for x in saved["scores"]], saved["policy"]["counts"], saved["seconds"]
        batch = mp_data.calibration_batch(None, self.tokens("calib", corpus), 10, 64, seed)
        model = copy.deepcopy(self.dense)
        t0 = time.perf_counter()
        res = prune_model(model, batch, "policy-gradient", self.prune_config(ratio, layers), seed=seed, progress=False,
                          policy=PolicyConfig(seed=seed, steps=self.args.pg_steps))
        seconds = time.perf_counter() - t0
        counts = {}
        for e in res.report.layers:
            heads = e["removed_heads"] // max(e["num_key_value_heads"], 1)
            counts[e["layer"]] = (heads if e["kept_query_heads"] is not None else None,
                                  e["removed_channels"] if e["kept_channels"] is not None else None)
        self._save(disk, res.scores, seconds, {"counts": counts})
        return res.scores, counts, seconds

    @staticmethod
    def _save(disk: Path, scores, seconds, policy) -> None:
        disk.parent.mkdir(parents=True, exist_ok=True)
        tmp = disk.with_suffix(".tmp")
        torch.save({"scores": [(s.layer, None if s.attention is None else s.attention.float().cpu(),
                                None if s.mlp is None else s.mlp.float().cpu()) for s in scores],
                    "seconds": seconds, "policy": policy}, tmp)
        os.replace(tmp, disk)

    def prune(self, scores, cfg, counts, comp: CompensateConfig | None, batch):
        """A pruned (and compensated) copy of the dense model; (model, report, seconds)."""
        model = copy.deepcopy(self.dense)
        s = discover(model)
        t0 = time.perf_counter()
        rep = prune_structure(s, scores, cfg, counts, compensate=None if comp is None else compensator(s, comp, batch))
        return model, rep, time.perf_counter() - t0

    def write(self, rec: dict) -> None:
        rec = {**rec, "model": self.loaded.tag, "machine": machine_description("cpu"), "host": host_details(),
               "torch": torch.__version__, "git_commit": _git_commit(), "load_s": self.load_s,
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        append_record(self.path, rec)
        self.done.add(rec["key"])
        ppl = " ".join(f"{k}={v:.3f}" for k, v in rec["ppl"].items())
        log(f"{rec['key']}: {ppl} (compensation {rec['cost']['compensate_s']:.0f} s)")


def comp_summary(rep) -> dict | None:
    c = rep.compensation
    if not c:
        return None
    return {k: c[k] for k in ("mode", "damping", "tokens", "max_damping_used", "error_before_mean",
                              "error_after_mean", "bias_switches", "seconds")} | {"linears": len(c["layers"])}


# ----------------------------------------------------------------------------- the two kinds of cells
def run_tune(b: Bench, args) -> None:
    """Damping x calibration windows x mode on the calibration fit/validation split (module docstring)."""
    val = b.tokens("val")
    ratio, target = b.ratio(args.tune_size, args.tune_layers)
    cfg = b.prune_config(ratio, args.tune_layers)
    for seed in args.seeds:
        scores, score_s, _ = b.scores("taylor", seed, "fit", args.calib)
        score_batch = mp_data.calibration_batch(None, b.tokens("fit"), 10, 64, seed)
        grid = [("none", None, 0)] + [(m, d, e) for m in args.modes for d in args.dampings for e in args.examples]
        for mode, damping, examples in grid:
            key = (f"tune|{b.loaded.tag}|taylor|s{seed}|size{args.tune_size}|{args.tune_layers}|{mode}|d{damping}|"
                   f"e{examples}x{args.seq_len}|val{args.windows}{_corpus_tag(args.calib)}")
            batch = score_batch if not examples else \
                mp_data.calibration_batch(None, b.tokens("fit"), examples, args.seq_len, seed)
            if mode != "none":
                _fit_reference(b, args, scores, cfg, seed, examples, batch)
            if key in b.done:
                continue
            comp = None if mode == "none" else CompensateConfig(mode=mode, damping=damping)
            model, rep, comp_s = b.prune(scores, cfg, None, comp, batch)
            p_val, _, ev = evaluate(model, val, args.windows, 0, 1024)
            p_fit = _ppl_of(model, batch)
            b.write({"key": key, "kind": "tune", "calib": args.calib, "method": "taylor", "seed": seed,
                     "size": args.tune_size,
                     "layers": args.tune_layers, "ratio": ratio, "target_params": target, "mode": mode,
                     "damping": damping, "examples": examples, "seq_len": args.seq_len if examples else 64,
                     "tokens": int(batch.numel()), "params_after": rep.params_after, "params_before": rep.params_before,
                     "ppl": {"calib-val": p_val, "fit": p_fit}, "compensation": comp_summary(rep),
                     "cost": {"score_s": score_s, "compensate_s": rep.compensation["seconds"] if rep.compensation else 0.0,
                              "prune_s": comp_s, "eval_s": ev}})


def _fit_reference(b: Bench, args, scores, cfg, seed: int, examples: int, batch) -> None:
    """The uncompensated model's PPL on the compensation windows of (seed, examples): what ``fit`` is compared
    with (record kind ``tune-ref``, once per window set)."""
    key = (f"tune-ref|{b.loaded.tag}|taylor|s{seed}|size{args.tune_size}|{args.tune_layers}|e{examples}x{args.seq_len}"
           f"{_corpus_tag(args.calib)}")
    if key in b.done:
        return
    model, rep, _ = b.prune(scores, cfg, None, None, batch)
    b.write({"key": key, "kind": "tune-ref", "calib": args.calib, "seed": seed, "size": args.tune_size, "layers": args.tune_layers,
             "examples": examples, "tokens": int(batch.numel()), "ppl": {"fit": _ppl_of(model, batch)},
             "cost": {"compensate_s": 0.0}})


def _ppl_of(model, batch) -> float:
    """PPL of ``batch``'s windows: 128-token windows of its rows, or the rows themselves when shorter."""
    if batch.shape[1] >= 128:
        return evaluate(model, batch.reshape(-1), batch.numel() // 128, 0, 1024)[0]
    return _rows_ppl(model, batch)


def _rows_ppl(model, batch) -> float:
    """Perplexity of the rows of ``batch`` themselves (windows shorter than 128 tokens)."""
    with torch.no_grad():
        logits = model(batch).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return float(torch.exp(loss))


def run_cells(b: Bench, args) -> None:
    held = {t: b.tokens(f"{t}-heldout") for t in args.texts}
    t_start = time.perf_counter()
    for size in args.sizes:
        for seed in args.seeds:
            for method in args.methods:
                for layers in args.layers:
                    if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                        log(f"budget of {args.budget_s:.0f} s spent")
                        return
                    _group(b, args, held, method, seed, size, layers)


def _group(b: Bench, args, held, method, seed, size, layers) -> None:
    ratio, target = b.ratio(size, layers)
    modes = ["none"] + args.modes
    keys = {m: (f"cell|{b.loaded.tag}|{method}|s{seed}|size{size}|{layers}|{m}"
                + ("" if m == "none" else f"|d{args.damping}|e{args.examples[0]}x{args.seq_len}")
                + f"|{'+'.join(args.texts)}{args.windows}"
                + _corpus_tag(args.score_calib).replace("calib-", "units-")
                + ("" if m == "none" else _corpus_tag(args.calib))) for m in modes}
    if all(k in b.done for k in keys.values()):
        return
    cfg = b.prune_config(ratio, layers)
    counts = None
    if method == "pg-taylor":
        scores, counts, score_s = b.policy_mask(seed, ratio, layers, args.score_calib)
    else:
        scores, score_s, _ = b.scores(method, seed, "calib", args.score_calib)
    batch = mp_data.calibration_batch(None, b.tokens("calib"), args.examples[0], args.seq_len, seed)
    for mode in modes:
        if keys[mode] in b.done:
            continue
        comp = None if mode == "none" else CompensateConfig(mode=mode, damping=args.damping)
        model, rep, prune_s = b.prune(scores, cfg, counts, comp, batch)
        ppl, ev = {}, 0.0
        for text, ids in held.items():
            ppl[text], _, s = evaluate(model, ids, args.windows, 0, 1024)
            ev += s
        b.write({"key": keys[mode], "kind": "cell", "method": method, "seed": seed, "size": size, "layers": layers,
                 "calib": None if comp is None else args.calib, "score_calib": args.score_calib, "ratio": ratio, "target_params": target, "mode": mode,
                 "damping": None if comp is None else args.damping,
                 "examples": None if comp is None else args.examples[0], "seq_len": args.seq_len,
                 "tokens": 0 if comp is None else int(batch.numel()), "params_before": rep.params_before,
                 "params_after": rep.params_after, "windows": args.windows, "ppl": ppl,
                 "kept": kept_units(rep, b.structure), "compensation": comp_summary(rep),
                 "cost": {"score_s": score_s, "compensate_s": rep.compensation["seconds"] if rep.compensation else 0.0,
                          "prune_s": prune_s, "eval_s": ev},
                 "flops": {"compensate": compensation_flops(b.structure, rep.compensation, int(batch.numel())),
                           "scoring": scoring_flops(method, b.total, 640)}})


def run_dense(b: Bench, args) -> None:
    key = f"dense|{b.loaded.tag}|{'+'.join(args.texts)}{args.windows}|val{args.windows}{_corpus_tag(args.calib)}"
    if key in b.done:
        return
    ppl, ev = {}, 0.0
    for text in args.texts:
        ppl[text], _, s = evaluate(b.dense, b.tokens(f"{text}-heldout"), args.windows, 0, 1024)
        ev += s
    ppl["calib-val"], _, s = evaluate(b.dense, b.tokens("val"), args.windows, 0, 1024)
    b.write({"key": key, "kind": "dense", "calib": args.calib, "method": "dense", "params_after": b.total, "blocks": b.blocks,
             "ppl": ppl, "windows": args.windows, "cost": {"compensate_s": 0.0, "eval_s": ev + s}})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("tune", "cell"))
    p.add_argument("--model", default=None, help="omitted: the embedded SmolLM2-135M; 'tiny-random' for tests")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scores-cache", default="/tmp/compensation_scores")
    p.add_argument("--calib", default="pydoc", choices=mp_data.CORPORA,
                   help="corpus whose calibration side the compensation fits (tune: also scores and validates on)")
    p.add_argument("--score-calib", default="pydoc", choices=mp_data.CORPORA,
                   help="cells: corpus whose calibration side the units are scored on")
    p.add_argument("--texts", type=_strs, default=list(TEXTS), help="held-out corpora evaluated (cells)")
    p.add_argument("--windows", type=int, default=32, help="128-token windows per evaluated text")
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--methods", type=_strs, default=["taylor"], help=f"cells: {', '.join(METHODS)}")
    p.add_argument("--sizes", type=_floats, default=[0.2], help="fractions of the decoder blocks' parameters removed")
    p.add_argument("--layers", type=_strs, default=["4:30", "0:30"], help="layer ranges (START:END)")
    p.add_argument("--modes", type=_strs, default=["weights"], help=f"compensation modes ({', '.join(MODES)})")
    p.add_argument("--damping", type=float, default=0.01, help="cells: the damping fraction")
    p.add_argument("--dampings", type=_floats, default=[0.001, 0.01, 0.1, 1.0], help="tune: the damping grid")
    p.add_argument("--examples", type=_ints, default=[64],
                   help="compensation windows (tune: the grid, 0 = the 10 x 64 scoring batch; cells: the first)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per compensation window")
    p.add_argument("--tune-size", type=float, default=0.2)
    p.add_argument("--tune-layers", default="4:30")
    p.add_argument("--pg-steps", type=int, default=PolicyConfig.steps)
    p.add_argument("--budget-s", type=float, default=None, help="cells: stop starting groups after this many seconds")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS] + [m for m in args.modes if m not in MODES]
    if bad:
        build_parser().error(f"unknown method or mode {bad}")
    b = Bench(args)
    run_dense(b, args)
    (run_tune if args.kind == "tune" else run_cells)(b, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
