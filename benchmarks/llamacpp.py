"""SmolLM2-135M pruned by the default command, exported to GGUF and run in llama.cpp (llama-cpp-python).

Measured, for the dense model and the pruned one:

- held-out perplexity on the same token windows as ``moreau-prune``'s report (the pydoc held-out
  text, tokenised once; non-overlapping windows of 128 and 1024 tokens, the first 8192 tokens):
  ours (``load_pruned`` in fp32, ``moreau_pruner.evaluate.perplexity``) and llama.cpp's (the same
  windows, each evaluated from an empty KV cache, NLL of tokens 2..n from llama.cpp's logits), for
  every ``--outtypes`` file;
- speed in llama.cpp: prompt processing of a 512-token prompt and single-token decoding (128 steps
  after that prompt), tokens/s, median of ``--repeats`` runs with dense and pruned interleaved;
- the GGUF file sizes.

    moreau-prune --out pruned-smollm2                     # the default command
    python benchmarks/llamacpp.py --pruned pruned-smollm2

Writes ``results/llamacpp/llamacpp.json`` and ``results/llamacpp/LLAMACPP.md``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Meta, loadavg, write_results  # noqa: E402


def llama_cpp_ppl(path: Path, ids: list[int], seq_len: int, n_windows: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seq_len, n_batch=seq_len, n_ubatch=min(seq_len, 512),
                          n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    nll = 0.0
    try:
        for w in range(n_windows):
            window = ids[w * seq_len:(w + 1) * seq_len]
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[:seq_len - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
            nll += float((logz - logits[np.arange(seq_len - 1), window[1:]]).sum())
    finally:
        llm.close()
    return math.exp(nll / (n_windows * (seq_len - 1)))


def llama_cpp_speed(path: Path, prompt: list[int], decode: list[int], threads: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of one run from an empty cache."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + len(decode) + 8, n_batch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pp = len(prompt) / (time.perf_counter() - t)
        t = time.perf_counter()
        for tok in decode:
            llm.eval([tok])
        tg = len(decode) / (time.perf_counter() - t)
    finally:
        llm.close()
    return pp, tg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruned", required=True, help="the directory moreau-prune --out wrote")
    p.add_argument("--outtypes", default="f32,f16", help="GGUF outtypes to evaluate (default f32,f16)")
    p.add_argument("--seq-lens", default="128,1024")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speed-outtype", default="f16", help="the GGUF outtype whose speed is measured (default f16)")
    p.add_argument("--out", type=Path, default=RESULTS / "llamacpp")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import llama_cpp

    from moreau_pruner import load_pruned, save_uniform
    from moreau_pruner.data import heldout_text, tokenize_text
    from moreau_pruner.evaluate.perplexity import evaluate_perplexity
    from moreau_pruner.io.gguf import export_gguf
    from moreau_pruner.model.loading import load_model

    meta = Meta("cpu")
    records, rows = [], {}
    lens = [int(x) for x in args.seq_lens.split(",")]
    outtypes = args.outtypes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense, tok = load_model()  # the embedded SmolLM2-135M-Instruct, fp32
        save_uniform(dense, tmp / "dense", tokenizer=tok)
        del dense
        models = {"dense": tmp / "dense", "pruned": Path(args.pruned)}
        ids_t = tokenize_text(tok, heldout_text("pydoc"))
        ids = ids_t.tolist()
        files = {}
        for name, d in models.items():
            model, _ = load_pruned(d, dtype=torch.float32)
            params = sum(p.numel() for p in model.parameters())
            rows[name] = {"params": params}
            for n in lens:
                windows = max(1, args.eval_tokens // n)
                ours = evaluate_perplexity(model, None, ids_t, seq_len=n, max_windows=windows, progress=False)
                rows[name][f"ours@{n}"] = ours.ppl
                records.append(meta.record("perplexity", "ours (load_pruned, fp32)", [ours.n_windows, n], "float32",
                                           "ppl", "ppl", ours.ppl, model=name, params=params))
            del model
            for outtype in outtypes:
                f = tmp / f"{name}-{outtype}.gguf"
                plan = export_gguf(d, f, outtype)
                files[name, outtype] = f
                rows[name][f"arch-{outtype}"] = plan.arch
                rows[name][f"bytes-{outtype}"] = f.stat().st_size
                for n in lens:
                    windows = min(max(1, args.eval_tokens // n), len(ids) // n)
                    ppl = llama_cpp_ppl(f, ids, n, windows, args.threads)
                    rows[name][f"{outtype}@{n}"] = ppl
                    records.append(meta.record("perplexity", f"llama.cpp {llama_cpp.__version__}", [windows, n], outtype,
                                               "ppl", "ppl", ppl, model=name, params=params, arch=plan.arch,
                                               gguf_bytes=f.stat().st_size))
        prompt, decode = ids[:512], ids[512:640]
        speed = {name: {"pp": [], "tg": []} for name in models}
        for _ in range(args.repeats):
            for name in models:
                pp, tg = llama_cpp_speed(files[name, args.speed_outtype], prompt, decode, args.threads)
                speed[name]["pp"].append(pp)
                speed[name]["tg"].append(tg)
        for name in models:
            for kind, label in (("pp", "prompt 512 tokens"), ("tg", "decode 128 tokens")):
                value = statistics.median(speed[name][kind])
                rows[name][kind] = value
                records.append(meta.record("speed", f"llama.cpp {llama_cpp.__version__}", label, args.speed_outtype,
                                           kind, "tokens/s", value, model=name, runs=speed[name][kind],
                                           threads=args.threads))
    header = dict(kind="llamacpp", device="cpu", device_name=meta.base["device_name"], threads=args.threads,
                  pruned=str(args.pruned), llama_cpp_python=llama_cpp.__version__)
    write_results(args.out / "llamacpp.json", records, **header)
    (args.out / "LLAMACPP.md").write_text(render(rows, lens, outtypes, args, meta, llama_cpp.__version__))
    print((args.out / "LLAMACPP.md").read_text())
    return 0


def render(rows: dict, lens: list[int], outtypes: list[str], args, meta, version: str) -> str:
    d, p = rows["dense"], rows["pruned"]
    lines = [
        "# SmolLM2-135M in llama.cpp: dense vs pruned by the default command",
        "",
        f"Written by `python benchmarks/llamacpp.py --pruned {args.pruned}` on {meta.base['device_name']} "
        f"({args.threads} thread), llama-cpp-python {version}, commit {meta.base['commit']}, {meta.base['date']}; "
        f"load average at the end {loadavg()}. Held-out pydoc text, the first {args.eval_tokens} tokens in "
        f"windows of {' and '.join(map(str, lens))}; the same token ids for both engines.",
        "",
        "| model | parameters | GGUF arch | " + " | ".join(f"PPL@{n} ours | " + " | ".join(
            f"PPL@{n} llama.cpp {o}" for o in outtypes) for n in lens) + " |",
        "|---|---|---|" + "---|" * (len(lens) * (1 + len(outtypes))),
    ]
    for name, r in (("dense", d), ("pruned", p)):
        cells = [f"{r[f'ours@{n}']:.3f} | " + " | ".join(f"{r[f'{o}@{n}']:.3f}" for o in outtypes) for n in lens]
        lines.append(f"| {name} | {r['params']:,} | {r[f'arch-{outtypes[0]}']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Speed ({args.speed_outtype} GGUF, {args.threads} thread, median of {args.repeats} interleaved runs):",
        "",
        "| model | GGUF MiB | prompt (512 tokens) tokens/s | decode tokens/s |",
        "|---|---|---|---|",
    ]
    for name, r in (("dense", d), ("pruned", p)):
        lines.append(f"| {name} | {r[f'bytes-{args.speed_outtype}'] / 2**20:.1f} | {r['pp']:.1f} | {r['tg']:.1f} |")
    lines += ["", f"Pruned/dense: parameters {p['params'] / d['params']:.4f}, file "
              f"{p[f'bytes-{args.speed_outtype}'] / d[f'bytes-{args.speed_outtype}']:.4f}, prompt speed "
              f"{p['pp'] / d['pp']:.3f}x, decode speed {p['tg'] / d['tg']:.3f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
