"""Recorded fingerprints of a broad set of pruning runs, so that a refactor can prove it changed nothing.

Each case runs one CLI command or library call on a small random model (Llama with GQA and tied
embeddings, Mistral with GQA, Qwen2 with q/k/v biases, an MHA Llama) and reduces what it produced to
a fingerprint:

* ``weights``: SHA-256 of every tensor of the pruned model (name, dtype, shape, bytes), in name
  order. Pruning selects or zeroes weights, so this is exact on any CPU.
* ``report``: the report's structural fields (parameter counts, per-layer widths and kept units,
  backend, path) exactly, and its floats (perplexities, the Moreau log, allocation ratios, policy
  losses) to a relative tolerance, since another CPU's matrix kernels may round differently.
* ``summary``: for results that are floats themselves (Ĝ, a LoRA-trained model), a few
  statistics compared to a relative tolerance; the exact SHA is kept too and compared when
  ``MOREAU_GOLDEN_EXACT=1`` (on the machine that recorded them).

``python tests/golden.py --record`` (re)writes ``tests/data/golden.json``; ``tests/test_golden.py``
compares every case against it. Record only on purpose: a change of these numbers is a change of
behaviour.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN = HERE / "data" / "golden.json"
WORDS = ("the a of is to and in it that for on with as be by this are an or at from statement expression value "
         "object function name class return if else python module type list string number").split()
REL_TOL = 1e-4
#: report keys that change from run to run or name local paths
VOLATILE = {"times_s", "out", "settings", "torch", "model", "seconds", "include_path", "path", "adapter_dir",
            "output", "date", "elapsed_s", "wall_s"}


# ----------------------------------------------------------------------------- models
KINDS = {
    # name: (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=6, num_key_value_heads=2,
                                                       tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=6, num_key_value_heads=2,
                                                             tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=6, num_key_value_heads=3,
                                                       tie_word_embeddings=False)),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4,
                                                           head_dim=12, intermediate_size=56,
                                                           tie_word_embeddings=False)),
}


def tiny_model(kind: str, seed: int = 0, **overrides):
    """A small random model of ``kind``; ``overrides`` change its config (e.g. ``vocab_size``)."""
    import transformers

    cfg_name, cls_name, extra = KINDS[kind]
    kw = dict(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=4, head_dim=8,
              max_position_embeddings=256)
    kw.update(extra)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw))
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape))
    return model.eval()


def model_dir(root: Path, kind: str) -> Path:
    """A saved tiny model with a word tokenizer (made once per root)."""
    sys.path.insert(0, str(HERE))
    from _tiny import word_tokenizer

    d = root / f"model-{kind}"
    if not (d / "config.json").is_file():
        tiny_model(kind).save_pretrained(d)
        word_tokenizer(WORDS).save_pretrained(d)
    return d


def text_file(root: Path) -> Path:
    """A calibration/evaluation text in the tiny vocabulary (deterministic)."""
    f = root / "text.txt"
    if not f.is_file():
        g = torch.Generator().manual_seed(11)
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6000,), generator=g).tolist()]
        lines = [" ".join(words[i:i + 12]) + "." for i in range(0, len(words), 12)]
        f.write_text("\n".join(lines) + "\n")
    return f


# ----------------------------------------------------------------------------- fingerprints
def tensors_sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensors_summary(tensors: dict[str, torch.Tensor]) -> dict:
    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().double()
        out[name] = [float(t.sum()), float(t.abs().sum()), float(t.square().sum()), list(t.shape)]
    return out


def saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def clean_report(obj, root: Path | None = None):
    """The report without its run-dependent fields; paths under ``root`` written as ``<root>/...``."""
    if isinstance(obj, dict):
        return {k: clean_report(v, root) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_s")}
    if isinstance(obj, (list, tuple)):
        return [clean_report(v, root) for v in obj]
    if isinstance(obj, str) and root is not None:
        return obj.replace(str(root), "<root>")
    return obj


def compare(want, got, exact: bool, where: str = "") -> list[str]:
    """Differences between two JSON-like values (floats to REL_TOL unless ``exact``)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got)):
            if k not in got:
                out.append(f"{where}.{k}: missing")
            elif k not in want:
                out.append(f"{where}.{k}: new key")
            else:
                out += compare(want[k], got[k], exact, f"{where}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: length {len(got)} != {len(want)}"]
        out = []
        for i, (a, b) in enumerate(zip(want, got)):
            out += compare(a, b, exact, f"{where}[{i}]")
        return out
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if exact:
            ok = want == got or (math.isnan(want) and math.isnan(got))
        else:
            ok = math.isclose(want, got, rel_tol=REL_TOL, abs_tol=1e-9) or (math.isnan(want) and math.isnan(got))
        return [] if ok else [f"{where}: {got!r} != {want!r}"]
    return [] if want == got else [f"{where}: {got!r} != {want!r}"]


# ----------------------------------------------------------------------------- the cases
def _compensation_flags(flags) -> tuple[str, ...]:
    """Weight compensation is on by default for structured pruning; the cases recorded before that pin
    the pruning without it (``--no-compensate``), the ``*-compensate-*`` cases with it."""
    return () if any(f.startswith("--compensate") or f == "--no-compensate" for f in flags) else ("--no-compensate",)


def _prune_cli(root: Path, kind: str, *flags: str) -> dict:
    from moreau_pruner.cli.prune import main

    out = Path(tempfile.mkdtemp(dir=root))
    rep = out / "report.json"
    text = text_file(root)
    args = ["--model", str(model_dir(root, kind)), "--calib-file", str(text), "--eval-file", str(text),
            "--num-examples", "4", "--seq-len", "16", "--eval-seq-lens", "16,32", "--eval-tokens", "192",
            "--iters", "4", "--avg-last", "2", "--quiet", "--generate", "the value", "--out", str(out / "m"),
            "--json", str(rep), *_compensation_flags(flags), *flags]
    rc = main(args)
    if rc != 0:
        raise RuntimeError(f"moreau-prune {' '.join(flags)} exited {rc}")
    return _fingerprint(out, rep, root, flags)


def _fingerprint(out: Path, rep: Path, root: Path, flags) -> dict:
    """Selected weights are exact anywhere; compensated ones are float results (a least-squares solve), so
    their SHA is compared only with ``--exact`` and a summary to a tolerance otherwise."""
    w = saved_weights(out / "m")
    report = clean_report(json.loads(rep.read_text()), root)
    if _compensation_flags(flags):
        return {"weights": tensors_sha(w), "report": report}
    return {"exact": tensors_sha(w), "summary": tensors_summary(w), "report": report}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(root: Path, kind: str, world: int, *flags: str) -> dict:
    out = Path(tempfile.mkdtemp(dir=root))
    rep = out / "report.json"
    text = text_file(root)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "moreau_pruner.cli", "--distributed", "fsdp", "--device", "cpu",
           "--model", str(model_dir(root, kind)), "--calib-file", str(text), "--eval-file", str(text),
           "--num-examples", "6", "--seq-len", "16", "--eval-seq-lens", "16", "--eval-tokens", "192",
           "--iters", "3", "--avg-last", "2", "--quiet", "--generate", "", "--backend", "reference",
           "--out", str(out / "m"), "--json", str(rep), *_compensation_flags(flags), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(root))
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    return _fingerprint(out, rep, root, flags)


def _estimate(root: Path, kind: str, path: str, **cfg) -> dict:
    from moreau_pruner import MoreauConfig, estimate

    model = tiny_model(kind)
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    res = estimate(model, batch, MoreauConfig(iters=4, avg_last=2, **cfg), strategy=path, progress=False)
    return {"exact": tensors_sha(res.grads), "summary": tensors_summary(res.grads),
            "report": {"log": clean_report(res.log), "path": getattr(res, "path", None), "backend": res.backend}}


def _recover(root: Path, kind: str) -> dict:
    from moreau_pruner.cli.recover import main

    out = Path(tempfile.mkdtemp(dir=root))
    rc = main(["--model", str(model_dir(root, kind)), "--data", str(text_file(root)), "--out", str(out / "r"),
               "--max-steps", "3", "--batch-size", "2", "--cutoff-len", "16", "--eval-seq-len", "16",
               "--eval-windows", "4", "--quiet"])
    if rc != 0:
        raise RuntimeError(f"moreau-recover exited {rc}")
    w = saved_weights(out / "r")
    rec = json.loads((out / "r" / "recovery.json").read_text())
    return {"exact": tensors_sha(w), "summary": tensors_summary(w), "report": clean_report(rec, root)}


def cases() -> dict:
    """name -> callable(root) returning the fingerprint."""
    P = _prune_cli
    c = {
        # the Moreau estimate: modes, groups, paths, noise, samples, micro-batches, backends
        "prune-published-llama": lambda r: P(r, "llama", "--published", "--attn-layers", "0:4", "--ratio", "0.5"),
        "prune-default-mistral": lambda r: P(r, "mistral", "--ratio", "0.4"),
        "prune-paper-structure-qwen2": lambda r: P(r, "qwen2", "--mode", "paper", "--group", "structure",
                                                    "--ratio", "0.5", "--attn-layers", "all"),
        "prune-regen-llama": lambda r: P(r, "llama", "--estimator-path", "regen", "--ratio", "0.5",
                                         "--attn-layers", "1:4"),
        "prune-reference-path-qwen2": lambda r: P(r, "qwen2", "--estimator-path", "reference", "--ratio", "0.5",
                                                   "--attn-layers", "all", "--granularity", "kv-group"),
        "prune-torch-noise-mha": lambda r: P(r, "llama-mha", "--published", "--noise", "torch", "--ratio", "0.5",
                                             "--attn-layers", "0:3", "--mlp-layers", "1:4"),
        "prune-samples-microbatch-mistral": lambda r: P(r, "mistral", "--noise-samples", "2", "--micro-batch-size",
                                                        "2", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-checkpointing-llama": lambda r: P(r, "llama", "--gradient-checkpointing", "--ratio", "0.5",
                                                 "--attn-layers", "all", "--mlp-layers", "0:2"),
        "prune-regen-microbatch-qwen2": lambda r: P(r, "qwen2", "--estimator-path", "regen", "--micro-batch-size",
                                                    "3", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-reference-backend-llama": lambda r: P(r, "llama", "--backend", "reference", "--ratio", "0.5",
                                                     "--attn-layers", "all"),
        # other scores
        "prune-taylor-qwen2": lambda r: P(r, "qwen2", "--method", "taylor", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-taylor-second-llama": lambda r: P(r, "llama", "--method", "taylor", "--taylor-variant",
                                                 "param_second", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-taylor-mix-mistral": lambda r: P(r, "mistral", "--method", "taylor", "--taylor-variant", "param_mix",
                                                "--ratio", "0.5", "--attn-layers", "all", "--reduction", "max"),
        "prune-taylor-vectorize-mha": lambda r: P(r, "llama-mha", "--method", "taylor", "--vectorize", "--ratio",
                                                  "0.5", "--attn-layers", "all"),
        "prune-magnitude-qwen2": lambda r: P(r, "qwen2", "--method", "magnitude", "--ratio", "0.5",
                                             "--attn-layers", "all", "--reduction", "prod"),
        "prune-random-llama": lambda r: P(r, "llama", "--method", "random", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-upstream-heads-mistral": lambda r: P(r, "mistral", "--published", "--head-score",
                                                    "llm-pruner-upstream", "--reduction", "first", "--ratio", "0.5",
                                                    "--attn-layers", "all"),
        "prune-llmpruner-heads-qwen2": lambda r: P(r, "qwen2", "--head-score", "llm-pruner", "--reduction", "mean",
                                                   "--granularity", "kv-group", "--ratio", "0.5",
                                                   "--attn-layers", "all"),
        # scope, allocation, rounds, uniform, rounding, dtypes
        "prune-global-llama": lambda r: P(r, "llama", "--scope", "global", "--ratio", "0.3", "--attn-layers", "all"),
        "prune-global-kv-qwen2": lambda r: P(r, "qwen2", "--scope", "global", "--granularity", "kv-group",
                                             "--method", "taylor", "--ratio", "0.4", "--attn-layers", "all"),
        "prune-owl-mistral": lambda r: P(r, "mistral", "--allocation", "owl", "--ratio", "0.4", "--attn-layers", "all"),
        "prune-alpha-llama": lambda r: P(r, "llama", "--allocation", "alpha", "--method", "taylor", "--ratio", "0.4",
                                         "--attn-layers", "all"),
        "prune-farms-qwen2": lambda r: P(r, "qwen2", "--allocation", "farms", "--method", "magnitude", "--ratio",
                                         "0.4", "--attn-layers", "all"),
        "prune-rounds-llama": lambda r: P(r, "llama", "--rounds", "2", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-rounds-global-qwen2": lambda r: P(r, "qwen2", "--rounds", "3", "--scope", "global", "--method",
                                                 "taylor", "--ratio", "0.4", "--attn-layers", "all"),
        "prune-uniform-llama": lambda r: P(r, "llama", "--uniform", "--ratio", "0.5"),
        "prune-uniform-round-qwen2": lambda r: P(r, "qwen2", "--uniform", "--round-to", "8", "--method", "taylor",
                                                 "--ratio", "0.4", "--granularity", "kv-group"),
        "prune-uniform-mistral": lambda r: P(r, "mistral", "--uniform", "--published", "--ratio", "0.5"),
        "prune-round-to-mha": lambda r: P(r, "llama-mha", "--round-to", "8", "--ratio", "0.3", "--attn-layers", "all"),
        "prune-bf16-llama": lambda r: P(r, "llama", "--dtype", "bfloat16", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-fp16-qwen2": lambda r: P(r, "qwen2", "--dtype", "float16", "--ratio", "0.5", "--attn-layers", "all",
                                        "--half-gemm", "fp32-accumulate"),
        # weight compensation (the default for structured pruning): its windows from the calibration file
        "prune-compensate-llama": lambda r: P(r, "llama", "--compensate", "--ratio", "0.5", "--attn-layers", "all"),
        "prune-compensate-bias-rounds-mha": lambda r: P(r, "llama-mha", "--compensate", "--compensate-mode",
                                                        "weights+bias", "--rounds", "2", "--method", "taylor",
                                                        "--ratio", "0.5", "--attn-layers", "all"),
        "prune-compensate-uniform-qwen2": lambda r: P(r, "qwen2", "--compensate", "--uniform", "--ratio", "0.4",
                                                      "--compensate-examples", "8", "--compensate-seq-len", "32"),
        # unstructured, N:M, TRIM
        "us-moreau-llama": lambda r: P(r, "llama", "--unstructured", "--ratio", "0.5"),
        "us-wanda-qwen2": lambda r: P(r, "qwen2", "--unstructured", "--method", "wanda", "--ratio", "0.5"),
        "us-gblm-mistral": lambda r: P(r, "mistral", "--unstructured", "--method", "gblm", "--ratio", "0.5"),
        "us-nm-taylor-llama": lambda r: P(r, "llama", "--unstructured", "--method", "taylor", "--nm", "2:4"),
        "us-magnitude-keeplow-mha": lambda r: P(r, "llama-mha", "--unstructured", "--method", "magnitude",
                                                "--ratio", "0.6", "--keep-low-ratio", "0.1"),
        "us-wanda-onepass-owl-llama": lambda r: P(r, "llama", "--unstructured", "--method", "wanda",
                                                  "--one-pass-activations", "--allocation", "owl", "--ratio", "0.5"),
        "us-trim-wanda-qwen2": lambda r: P(r, "qwen2", "--unstructured", "--method", "wanda", "--allocation", "trim",
                                           "--ratio", "0.5"),
        "us-alpha-trim-moreau-mistral": lambda r: P(r, "mistral", "--unstructured", "--allocation", "alpha+trim",
                                                    "--ratio", "0.5", "--mode", "reference"),
        # policy gradient
        "pg-taylor-llama": lambda r: P(r, "llama", "--method", "policy-gradient", "--pg-steps", "6", "--ratio",
                                       "0.4", "--attn-layers", "all"),
        "pg-none-loo-qwen2": lambda r: P(r, "qwen2", "--method", "policy-gradient", "--init", "none",
                                         "--pg-baseline", "loo", "--pg-steps", "5", "--ratio", "0.4",
                                         "--granularity", "kv-group", "--attn-layers", "all"),
        "pg-moreau-prob-mistral": lambda r: P(r, "mistral", "--method", "policy-gradient", "--init", "moreau",
                                              "--pg-parametrization", "probability", "--pg-steps", "4",
                                              "--pg-batch-size", "2", "--ratio", "0.4", "--attn-layers", "all"),
        # the estimate alone, every path
        "estimate-reference-llama": lambda r: _estimate(r, "llama", "reference"),
        "estimate-lean-qwen2": lambda r: _estimate(r, "qwen2", "lean", mode="paper"),
        "estimate-regen-mistral": lambda r: _estimate(r, "mistral", "regen", micro_batch_size=2),
        "estimate-structure-mha": lambda r: _estimate(r, "llama-mha", "auto", mode="paper", group="structure"),
        "estimate-torch-noise-llama": lambda r: _estimate(r, "llama", "auto", noise="torch"),
        # FSDP2 (gloo, CPU)
        "fsdp2-published-llama": lambda r: _torchrun(r, "llama", 2, "--published", "--attn-layers", "0:4",
                                                    "--ratio", "0.5"),
        "fsdp3-structure-qwen2": lambda r: _torchrun(r, "qwen2", 3, "--mode", "paper", "--group", "structure",
                                                    "--ratio", "0.5", "--attn-layers", "all"),
        "fsdp2-taylor-uniform-mistral": lambda r: _torchrun(r, "mistral", 2, "--method", "taylor", "--uniform",
                                                           "--ratio", "0.5"),
        "fsdp3-second-global-llama": lambda r: _torchrun(r, "llama", 3, "--method", "taylor", "--taylor-variant",
                                                        "param_second", "--scope", "global", "--ratio", "0.3",
                                                        "--attn-layers", "all"),
        "fsdp2-compensate-mistral": lambda r: _torchrun(r, "mistral", 2, "--compensate", "--method", "taylor",
                                                       "--ratio", "0.5", "--attn-layers", "all"),
        # recovery
        "recover-qwen2": lambda r: _recover(r, "qwen2"),
    }
    return c


def run_case(name: str, root: Path) -> dict:
    import moreau_kernels as mk

    mk.set_backend("auto")
    torch.manual_seed(0)
    return cases()[name](root)


def check(name: str, want: dict, got: dict, exact: bool) -> list[str]:
    problems = []
    if "weights" in want and want["weights"] != got.get("weights"):
        problems.append(f"pruned weights differ: {got.get('weights')} != {want['weights']}")
    if exact and "exact" in want and want["exact"] != got.get("exact"):
        problems.append(f"exact tensors differ: {got.get('exact')} != {want['exact']}")
    if "summary" in want:
        problems += compare(want["summary"], got.get("summary"), exact, "summary")
    problems += compare(want["report"], got.get("report"), exact, "report")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--record", action="store_true", help="write tests/data/golden.json")
    ap.add_argument("--check", action="store_true", help="compare every case against tests/data/golden.json")
    ap.add_argument("--only", nargs="*", help="these cases only")
    ap.add_argument("--exact", action="store_true", help="compare floats and float tensors exactly")
    args = ap.parse_args(argv)
    names = args.only or list(cases())
    old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in names:
            got = run_case(name, root)
            if args.record:
                old[name] = got
                print(f"recorded {name}")
            else:
                problems = check(name, old[name], got, args.exact)
                failed += bool(problems)
                print(f"{'FAIL' if problems else 'ok  '} {name}" + "".join(f"\n    {p}" for p in problems[:10]))
    if args.record:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
