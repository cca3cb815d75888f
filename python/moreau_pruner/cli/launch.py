"""``moreau-prune --distributed fsdp --nproc-per-node N``: moreau-prune starts its own FSDP2 ranks.

The ranks are launched by PyTorch's own launcher (``torch.distributed.run``, what ``torchrun
--standalone`` runs) inside this process, so the job is one command whose failure reads like any other
moreau-prune error: the arguments are checked here before any rank starts (the checks that need no
model: options, ``--out``, ``--json``), a user error found by the ranks is printed once by rank 0 and
this process exits 2, and a rank that dies otherwise (a signal, a crash) gives one line naming the rank
and its exit status (its own output is above it) and exit 1 -- not torchrun's ``ChildFailedError``
traceback and failure table. ``torchrun --nproc-per-node N -m moreau_pruner.cli --distributed fsdp
...`` still works and is what a multi-node job uses.
"""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence

from .options import ExitStatus

#: the option that asks moreau-prune to launch its ranks
OPTION = "--nproc-per-node"


def rank_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` (also ``=N`` and the abbreviations argparse accepts, from
    ``--np``): the arguments of every rank."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and OPTION.startswith(name):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def check(nproc: int, distributed: str | None, env=None) -> None:
    """Refuse a launch that cannot be meant (a ValueError naming the problem)."""
    env = os.environ if env is None else env
    if nproc < 1:
        raise ValueError(f"{OPTION} must be >= 1, got {nproc}")
    if distributed is None:
        raise ValueError(f"{OPTION} starts the ranks of an FSDP2 job: add --distributed fsdp")
    if "RANK" in env:
        raise ValueError(f"{OPTION} launches the ranks itself; under torchrun leave it out (torchrun's own "
                         f"--nproc-per-node sets the ranks)")


def launch(argv: Sequence[str], nproc: int) -> None:
    """Run ``python -m moreau_pruner.cli <argv without --nproc-per-node>`` on ``nproc`` local ranks.

    Returns when every rank exited 0 (rank 0 printed the report); raises :class:`ExitStatus` 2 (the
    ranks already printed the error) or 1 with one line naming the first rank that failed otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "moreau_pruner.cli",
                                         *rank_arguments(argv)])
    # torchrun's own choice for several ranks on one host, without the warning it logs when it makes it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.run",
                                                  "torch.distributed.launcher")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:  # a user error: rank 0 printed it
            raise ExitStatus(2) from None
        code = failure.exitcode
        how = f"exit status {code}"
        if code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        raise ExitStatus(1, f"rank {rank} of {nproc} failed ({how}); its output is above") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
