"""Perplexity of several models on the same held-out windows (e.g. dense / pruned / recovered).

    python benchmarks/ppl_compare.py --text fortunes --models embedded /tmp/pruned /tmp/recovered \
        --out benchmarks/results/recovery/ood-fortunes.json

``--models`` takes directories, .gguf files or ``embedded`` (the packaged SmolLM2); ``--text`` a
corpus name (its held-out part is used) or a text file. Writes one JSON record with the command,
device, date and the perplexity of every model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys

import torch

from moreau_pruner import data
from moreau_pruner.evaluate import perplexity as evaluate
from moreau_pruner.model.loading import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--text", default="fortunes", help="corpus name (held-out part) or a text file")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    text = data.heldout_text(args.text) if args.text in ("pydoc", "fortunes") else data.load_text(args.text)
    rows = []
    for spec in args.models:
        model, tok = load_model(None if spec == "embedded" else spec)
        ids = data.tokenize_text(tok, text)
        ppl = evaluate.perplexity(model, None, ids, seq_len=args.seq_len, max_windows=args.windows, progress=False)
        rows.append({"model": spec, "params": sum(p.numel() for p in model.parameters()), "ppl": ppl})
        print(f"{spec}: PPL@{args.seq_len} {ppl:.3f}", flush=True)
    record = {"command": shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv]), "text": args.text,
              "seq_len": args.seq_len, "windows": args.windows, "results": rows,
              "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
