"""``moreau-export``: write a saved model directory in another engine's format (GGUF for llama.cpp)."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Write a model directory this package wrote (moreau-prune --out, with or without --uniform;
moreau-recover --out; or a dense Hugging Face Llama/Mistral/Qwen2 directory) as one GGUF file
for llama.cpp and what is built on it (llama-cpp-python, ollama, LM Studio).

Uniform models are written as the llama architecture (qwen2 for a Qwen2 whose heads still fill
the hidden size); models whose layers differ as deci, whose head counts and MLP widths are
per-layer arrays. The tokenizer (byte-level BPE) and the chat template are carried over. What
GGUF cannot express is refused before anything is written."""


def build_parser() -> argparse.ArgumentParser:
    from ..io.gguf import OUTTYPES

    p = argparse.ArgumentParser(prog="moreau-export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="DIR", help="the model directory to export")
    p.add_argument("--gguf", metavar="OUT.gguf", required=True, help="the GGUF file to write")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f16",
                   help="storage of the weight matrices (default: f16; norms and biases stay f32; q8_0 keeps "
                        "matrices whose rows are not whole 32-value blocks in f16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")
    return p


def format_summary(plan) -> str:
    layers = (f"per-layer: heads {min(plan.head_count)}-{max(plan.head_count)}, KV heads "
              f"{min(plan.head_count_kv)}-{max(plan.head_count_kv)}, MLP {min(plan.feed_forward_length)}-"
              f"{max(plan.feed_forward_length)}" if plan.per_layer else
              f"{plan.head_count[0]} heads, {plan.head_count_kv[0]} KV heads, MLP {plan.feed_forward_length[0]}")
    rows = [("architecture", f"{plan.arch} ({plan.n_layers} layers; {layers}; head_dim {plan.head_dim})"),
            ("weights", f"{plan.outtype}, {plan.tensors} tensors"
                        + (f" ({len(plan.f16_fallback)} kept f16: rows not whole q8_0 blocks)"
                           if plan.f16_fallback else "")),
            ("tokenizer", f"gpt2 BPE, pre-tokenizer {plan.tokenizer_pre!r}, {plan.n_vocab} tokens"),
            ("written", plan.path)]
    return "\n".join(f"{k:<14}{v}" for k, v in rows)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..io.gguf import export_gguf

    try:
        plan = export_gguf(args.model, args.gguf, args.outtype, overwrite=args.overwrite)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            ImportError) as e:
        print(f"moreau-export: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
