"""The option vocabulary the three CLIs share, their checks, and one exception policy.

``moreau-prune``, ``moreau-recover`` and ``moreau-eval`` name the same things the same way: the
model (``--model``), the output directory (``--out``, ``--overwrite``), the report file
(``--json``), progress bars (``--quiet``), the device and dtype (``--device``, ``--dtype``), the seed
(``--seed``) and the evaluation (``--eval-...``). The options are defined here once, with one help
text each. An old spelling stays as a hidden alias that prints a one-line note when used
(:class:`DeprecatedAlias`), since scripts and torchrun lines out there use them.

:func:`main` is the exception policy of every CLI: a user error (bad input, a missing file or
extra, an estimate that cannot go on) is one line on stderr, ``PROG: error: ...``, and exit
status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

DTYPES = ("float32", "bfloat16", "float16")


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's ``dest`` and prints a note."""

    def __init__(self, option_strings, dest, new: str, nargs=None, **kwargs):
        self.new = new
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values if self.nargs != 0 else self.const)


def add_alias(group, old: str, new: str, dest: str, **kwargs) -> None:
    """``old`` as a hidden, deprecated spelling of the option ``new`` (same ``dest``, same type)."""
    group.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, default=argparse.SUPPRESS, **kwargs)


# ----------------------------------------------------------------------------- the shared options
def add_model(group, required: bool = False, what: str = "the model") -> None:
    default = "" if required else " (default: the embedded SmolLM2-135M-Instruct)"
    group.add_argument("--model", required=required,
                       help=f"{what}: a .gguf file, a local Hugging Face model directory, or a directory written by "
                            f"moreau-prune or moreau-recover{default}")


def add_device(group, default: str | None = "cpu", what: str = "") -> None:
    shown = "default: cpu" if default == "cpu" else f"default: {default}"
    group.add_argument("--device", default=default, help=f"cpu or cuda[:N]{what} ({shown})")


def add_dtype(group, default: str | None = "float32", what: str = "weight dtype") -> None:
    shown = f"default: {default}" if default else "default: bfloat16 on a GPU, float32 on a CPU"
    group.add_argument("--dtype", default=default, choices=DTYPES, help=f"{what} ({shown})")


def add_seed(group, what: str) -> None:
    group.add_argument("--seed", type=int, default=0, help=f"seed of {what} (default: 0)")


def add_output(group, what: str, required: bool = False, overwrite: str = "replace an existing --out directory") -> None:
    group.add_argument("--out", required=required, help=what)
    group.add_argument("--overwrite", action="store_true", help=overwrite)


def add_report(group, extra: str = "") -> None:
    group.add_argument("--json", metavar="FILE", help=f"write the report to this JSON file{extra}")


def add_quiet(group) -> None:
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval(group) -> None:
    """Held-out perplexity: window lengths and how many held-out tokens."""
    group.add_argument("--no-eval", dest="eval", action="store_false", help="skip the perplexity evaluation")
    group.add_argument("--eval-seq-lens", default="128,1024",
                       help="window lengths for perplexity, comma-separated (default 128,1024)")
    group.add_argument("--eval-tokens", type=int, default=8192,
                       help="evaluate on the first N held-out tokens, for every window length (default 8192: "
                            "64 windows of 128 and 8 of 1024; 0 = all of it, slow on a CPU)")


# ----------------------------------------------------------------------------- their checks
def parse_eval_lens(spec: str) -> list[int]:
    try:
        lens = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--eval-seq-lens must be comma-separated integers, got {spec!r}") from None
    if not lens or any(n < 2 for n in lens):
        raise ValueError(f"--eval-seq-lens needs window lengths >= 2, got {spec!r}")
    return lens


def check_out(out: str | None, overwrite: bool, model: str | None = None) -> None:
    """:func:`check_out_target`, and an existing, non-empty ``--out`` is replaced only with ``--overwrite``."""
    check_out_target(out, overwrite, model)
    if out and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def check_out_target(out: str | None, overwrite: bool, model: str | None = None) -> None:
    """``--out`` can hold the output and destroys nothing: not empty text, not a file, not ``--model``, a
    directory holding it or a directory inside it (through symlinks and ``..`` too: ``--overwrite`` would
    replace the input), and writable; ``--overwrite`` needs an ``--out``. Left-overs of killed runs that
    wrote ``--out`` are cleaned here, before the run (:func:`moreau_pruner.io.staging.clean_stale`)."""
    from ..io.staging import clean_stale
    from ..io.target import check_writable

    if out is None:
        if overwrite:
            raise ValueError("--overwrite replaces an existing --out, but no --out was given")
        return
    if not out.strip():
        raise ValueError("--out is empty; give a directory to write the output to")
    target = Path(out).expanduser()
    if model is not None:
        source, resolved = Path(model).expanduser().resolve(), target.resolve()
        if resolved == source or resolved in source.parents:
            what = "is" if resolved == source else "holds"
            raise ValueError(f"--out {out} {what} the input model {model}: writing there would destroy it "
                             "(also with --overwrite); choose another --out")
        if source in resolved.parents and source.is_dir():
            raise ValueError(f"--out {out} is inside the input model {model}: writing there would change the "
                             "model directory; choose an --out outside it")
    clean_stale(target)  # what killed runs left there (a lost --out comes back from its old copy)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--out {out} is an existing file, not a directory")
    check_writable(target, "--out")


def check_report(path: str | None) -> None:
    """``--json`` names a file that can be written: not empty text, not a directory, in an existing,
    writable directory."""
    from ..io.target import check_writable

    if path is None:
        return
    if not path.strip():
        raise ValueError("--json is empty; give a file name for the report")
    target = Path(path).expanduser()
    if target.is_dir():
        raise IsADirectoryError(f"--json {path} is a directory; give a file name")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--json {path}: the directory {target.parent} does not exist")
    check_writable(target, "--json")


def check_device(spec: str):
    """``--device`` as a torch.device, or a ValueError that says why this machine cannot use it."""
    import torch

    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device {spec!r} is not a device name (use cpu, cuda or cuda:N): {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec!r}: the models run on cpu or cuda[:N], not {dev.type}")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"--device {spec}: this torch ({torch.__version__}) is a CPU-only build; install a "
                             "CUDA build of torch, or use --device cpu")
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            extra = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            raise ValueError(f"--device {spec}: no CUDA device is visible on this machine{extra}; "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    return dev


# ----------------------------------------------------------------------------- the exception policy
def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input or an environment that cannot run the command."""
    from moreau_kernels import BackendUnavailable

    from ..estimate.config import EstimatorError
    from ..evaluate.zeroshot import TaskDataUnavailable
    from ..io.target import OutputError

    return (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            ImportError, EstimatorError, BackendUnavailable, FloatingPointError, TaskDataUnavailable,
            OutputError)


class ExitStatus(Exception):
    """Ends a command with exit status ``code``; ``message`` (if any) is printed as its one error line
    (``None``: the error was already printed, e.g. by the ranks of a job the command launched)."""

    def __init__(self, code: int, message: str | None = None):
        super().__init__(message or f"exit status {code}")
        self.code, self.message = code, message


def main(prog: str, parser: argparse.ArgumentParser, run: Callable, show: Callable[[object], None],
         argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, ``run(args)``, ``show(result)`` (unless None); a user error is one line and
    exit status 2. Under torchrun (``--distributed``) only rank 0 prints it, every rank exits 2: the
    checks before the process group runs see the same arguments and files on every rank, and the
    errors after it are raised alike on every rank (the device check compares the ranks, rank 0's
    failure is sent to all), so the other ranks would print the same line again."""
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except ExitStatus as e:
        if e.message:
            print(f"{prog}: error: {e.message}", file=sys.stderr)
        return e.code
    except user_errors() as e:
        if not (getattr(args, "distributed", None) and os.environ.get("RANK", "0") != "0"):
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        show(result)
    return 0
