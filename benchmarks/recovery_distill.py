#!/usr/bin/env python
"""Recovery of a pruned model at one budget: LoRA with the LM loss, LoRA with distillation, and full
fine-tuning with distillation, scored in domain and out of domain.

Every run is one ``moreau-recover`` process (one torch thread, ``OMP_NUM_THREADS=1``) on the same
pruned directory, recovery text and budget (``--steps`` x ``--batch-size`` x ``--cutoff-len`` tokens of
the recovery text's calibration side), scored on the held-out side of that text (in domain) and on the
held-out side of ``--ood-data`` (out of domain; the teacher, i.e. the dense model, is scored on the same
windows by the distillation runs). One JSON record per run goes to ``--results`` (the run's
``recovery.json`` plus the command, the device, the machine load sampled during the run, the seconds
per step and a GPU estimate from the FLOPs of a step); the tables of ``results/recovery/README.md``
and QUALITY.md are rendered from those records (``--render``, also done after every run). A record
that exists is not run again; a killed run continues from its checkpoint when the command is repeated.

    python benchmarks/recovery_distill.py --pruned /tmp/pruned --prune-command "moreau-prune --out /tmp/pruned" \\
        --run lora-lm:3e-4 --run lora-kd:1e-3 --run full-kd:5e-5 --steps 300 --seeds 0 1 2
    python benchmarks/recovery_distill.py --pilot --pruned /tmp/pruned --run lora-kd:3e-4 --run lora-kd:1e-3 --steps 50
    python benchmarks/recovery_distill.py --pilot --pruned /tmp/pruned --data generated --ood-data fortunes,pydoc \
        --run full-kd:2e-4 --steps 50 --lr-schedule cosine
    python benchmarks/recovery_distill.py --render

``--data generated`` trains on text the teacher samples itself (``moreau-recover --data generated``, which
needs a distillation configuration); its in-domain text is then the held-out part of those samples, and a
second ``--ood-data`` text (``fortunes,pydoc``) scores the corpus the other rows call in domain.
``--lr-schedule`` and ``--generate-samples`` are passed through; a run's record name carries its recovery
text and schedule when they are not pydoc and constant, so such rows never collide with the pydoc rows.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as C
import render_quality

RESULTS = C.RESULTS / "recovery" / "distill"
README = C.RESULTS / "recovery" / "README.md"
#: the recovery configurations: name -> moreau-recover flags
CONFIGS = {
    "lora-lm": (),
    "lora-kd": ("--distill",),
    "full-kd": ("--distill", "--tuning", "full"),
}
#: the GPU of the estimate: H100 SXM dense bf16 peak, and the fraction of it a training step reaches
GPU_PEAK_FLOPS = 989e12
GPU_UTILISATION = 0.4
#: moreau-recover's name of teacher-generated recovery text
GENERATED = "generated"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruned", help="the pruned directory (moreau-prune --out)")
    p.add_argument("--prune-command", default="moreau-prune --out DIR", help="how --pruned was made (recorded)")
    p.add_argument("--run", action="append", default=[], metavar="CONFIG:LR",
                   help=f"a configuration ({', '.join(CONFIGS)}) and its learning rate; repeat")
    p.add_argument("--pilot", action="store_true", help="records are tagged pilot (learning-rate choice)")
    p.add_argument("--data", default="pydoc", help="recovery text (its calibration side is trained on)")
    p.add_argument("--ood-data", default="fortunes",
                   help="out-of-domain text (its held-out side is scored); several separated by commas")
    p.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                   help="moreau-recover --lr-schedule (the record's name says cosine)")
    p.add_argument("--generate-samples", type=int,
                   help="moreau-recover --generate-samples (with --data generated; default: moreau-recover's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--work", default="/tmp/recovery-distill", help="where the runs' outputs and checkpoints go")
    p.add_argument("--results", default=str(RESULTS), help="where the records go")
    p.add_argument("--render", action="store_true", help="only render the README and QUALITY.md")
    args = p.parse_args(argv)
    if not args.render and (not args.pruned or not args.run):
        p.error("--pruned and at least one --run are needed (or --render)")
    for spec in args.run:
        name, _, lr = spec.partition(":")
        if name not in CONFIGS or not lr:
            p.error(f"--run {spec!r}: expected CONFIG:LR with CONFIG one of {', '.join(CONFIGS)}")
        float(lr)
        if args.data == GENERATED and "--distill" not in CONFIGS[name]:
            p.error(f"--run {spec!r}: --data {GENERATED} is sampled from the teacher, so it needs a distillation "
                    f"configuration ({', '.join(c for c, f in CONFIGS.items() if '--distill' in f)})")
    if args.generate_samples is not None and args.data != GENERATED:
        p.error(f"--generate-samples applies to --data {GENERATED} only")
    return args


class LoadSampler:
    """The 1-minute load average, sampled every ``every`` seconds while a run goes."""

    def __init__(self, every: float = 20.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(C.loadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"mean": round(sum(s) / len(s), 2), "min": min(s), "max": max(s), "samples": len(s)}


def _params(directory: Path) -> int:
    """Parameters saved in a model directory's safetensors (a tied embedding counted once)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                n += math.prod(sf.get_slice(k).get_shape())
    return n


def step_flops(config: str, student_params: int, teacher_params: int | None, tokens: int) -> float:
    """Matrix-product FLOPs of one optimizer step (attention scores left out: under 4 % at 128 tokens).
    Forward ``2 N`` per token; backward ``2 N`` for the activations (LoRA: the frozen weights need no
    gradient) plus ``2 N`` for the weight gradients when every weight is trained; the teacher: forward."""
    student = (6 if config.startswith("full") else 4) * student_params * tokens
    teacher = 2 * teacher_params * tokens if teacher_params else 0
    return float(student + teacher)


#: the settings a record's name does not carry, which a recorded run must share with the one asked for
BUDGET_KEYS = ("steps", "batch_size", "cutoff_len", "data", "ood_data", "pruned")


def run_name(args, config: str, lr: str, seed: int) -> str:
    """``TAG-CONFIG[-TEXT][-SCHEDULE]-lrLR-sSEED``: the text and the schedule only when not pydoc and constant
    (the names of the records made before either could change)."""
    text = "" if args.data == "pydoc" else "-" + "".join(c if c.isalnum() else "_" for c in Path(args.data).stem)
    schedule = "" if args.lr_schedule == "constant" else f"-{args.lr_schedule}"
    return f"{'pilot' if args.pilot else 'final'}-{config}{text}{schedule}-lr{lr}-s{seed}"


def check_recorded(args, results: Path) -> None:
    """Raises SystemExit, before any run, when a record of a run asked for exists with another budget, data,
    pruned model or number of evaluation windows (its name would make it count as done)."""
    for seed in args.seeds:
        for spec in args.run:
            config, _, lr = spec.partition(":")
            path = results / f"{run_name(args, config, lr, seed)}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            asked = {k: getattr(args, k) for k in BUDGET_KEYS}
            asked["eval_windows"], r["eval_windows"] = args.eval_windows, r["report"]["config"]["eval_windows"]
            diff = [f"{k} {r.get(k)!r} recorded, {v!r} asked" for k, v in asked.items() if r.get(k) != v]
            if diff:
                raise SystemExit(f"{path} records this run with other settings ({'; '.join(diff)}); ask for the "
                                 f"same settings, or move the record (or {Path(args.work) / path.stem}) away first")


def run_one(args, config: str, lr: str, seed: int, results: Path, commit: str) -> Path | None:
    tag = "pilot" if args.pilot else "final"
    name = run_name(args, config, lr, seed)
    record_path = results / f"{name}.json"
    if record_path.exists():
        print(f"{name}: recorded already ({record_path})", flush=True)
        return None
    out = Path(args.work) / name
    cmd = [sys.executable, "-m", "moreau_pruner.recover", "--model", args.pruned, "--data", args.data, "--out", str(out),
           "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--cutoff-len", str(args.cutoff_len),
           "--lr", lr, "--seed", str(seed), "--eval-windows", str(args.eval_windows), "--ood-data", args.ood_data,
           "--save-every", str(args.save_every), "--quiet", *CONFIGS[config]]
    if args.lr_schedule != "constant":
        cmd += ["--lr-schedule", args.lr_schedule]
    if args.generate_samples is not None:
        cmd += ["--generate-samples", str(args.generate_samples)]
    reused = None
    if (out / "recovery.json").exists():
        print(f"{name}: finished output found in {out}, recording it", flush=True)
        wall, load = None, None
    else:
        reused = _seed_generated(args, out, seed)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        print(f"{name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with LoadSampler() as sampler:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = round(time.perf_counter() - t0, 1)
        load = sampler.summary()
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        print(proc.stdout.strip(), flush=True)
    report = json.loads((out / "recovery.json").read_text())
    student_params = _params(out)
    teacher_params = report["teacher"]["parameters"] if "teacher" in report else None
    tokens = args.batch_size * args.cutoff_len
    flops = step_flops(config, student_params, teacher_params, tokens)
    record = {
        "name": name, "tag": tag, "config": config, "lr": float(lr), "seed": seed,
        "steps": args.steps, "batch_size": args.batch_size, "cutoff_len": args.cutoff_len,
        "tokens_per_step": tokens, "data": args.data, "ood_data": args.ood_data, "lr_schedule": args.lr_schedule,
        "pruned": args.pruned, "prune_command": args.prune_command,
        "command": "OMP_NUM_THREADS=1 " + shlex.join(["python", *cmd[1:]]).replace(str(out), f"OUT/{name}"),
        "device": "cpu", "device_name": C.device_label("cpu"), "threads": 1, "torch": __import__("torch").__version__,
        "commit": commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": load, "wall_s": wall,
        # the samples were another run's (the same settings: moreau-recover took them instead of sampling)
        "generated_from": reused["file"] if reused and reused["settings"] == report["data"].get("generation") else None,
        "seconds_per_step": round(report["train_time_s"] / max(report["steps"], 1), 3),
        "student_parameters": student_params, "teacher_parameters": teacher_params,
        "flops_per_step": flops,
        "gpu_estimate": {"peak_flops": GPU_PEAK_FLOPS, "utilisation": GPU_UTILISATION,
                         "seconds_per_step": flops / (GPU_PEAK_FLOPS * GPU_UTILISATION),
                         "note": "FLOP-bound; a step of a 135M model at 256 tokens is launch-bound on a GPU, "
                                 "so this is a lower bound"},
        "report": report,
    }
    results.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, record_path)
    return record_path


def _generation_settings(path: Path) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("settings", "null"))


def _seed_generated(args, out: Path, seed: int) -> dict | None:
    """With --data generated: puts the samples another run of this work folder kept
    (``OUT/generated.safetensors``) with this seed and length into ``out/checkpoints``, where moreau-recover
    takes them instead of sampling again when all their settings (samples, length, temperature, seed, batch
    size, teacher) are the ones asked for, and samples anew otherwise. Returns the file copied and its
    settings, or None."""
    import shutil

    if args.data != GENERATED or (out / "checkpoints" / "generated.safetensors").exists():
        return None
    for other in sorted(Path(args.work).glob("*/generated.safetensors")):
        settings = _generation_settings(other)
        if settings and settings.get("seed") == seed and settings.get("length") == args.cutoff_len and (
                args.generate_samples is None or settings.get("samples") == args.generate_samples):
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(other, out / "checkpoints" / "generated.safetensors")
            return {"file": str(other), "settings": settings}
    return None


def render(results: Path = RESULTS, readme: Path = README, quality: bool = True) -> None:
    """Writes results/recovery/README.md and (``quality``) re-renders QUALITY.md."""
    lines = ["# Recovery after pruning", "",
             f"Generated by `python benchmarks/recovery_distill.py --render` from `{_rel(results)}/*.json` and "
             f"the records next to this file. Do not edit by hand.", ""]
    lines += render_quality.distill_markdown(results, heading="##")
    lines += render_quality.recovery_markdown(readme.parent)
    readme.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {readme}", flush=True)
    if quality:
        render_quality.render()
        print(f"wrote {render_quality.DEFAULT_OUT}", flush=True)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(C.ROOT)) if path.is_relative_to(C.ROOT) else str(path)


def main(argv=None) -> int:
    args = parse(argv)
    results = Path(args.results)
    if not args.render:
        check_recorded(args, results)
        commit = C.git_commit()  # before this run renders the README into the checkout
        for seed in args.seeds:
            for spec in args.run:
                config, _, lr = spec.partition(":")
                if run_one(args, config, lr, seed, results, commit) is not None:
                    render(results, quality=False)
    render(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
