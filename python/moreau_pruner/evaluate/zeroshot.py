"""Zero-shot accuracy with lm-evaluation-harness (``moreau-eval``).

Runs lm-eval's ``simple_evaluate`` with its ``HFLM`` wrapper on a model this package loads itself
(:func:`moreau_pruner.model.loading.load_model`: a dense Hugging Face directory, a pruned or recovered
directory written by :func:`moreau_pruner.io.pruned.save_pruned`, a GGUF file, or the embedded
SmolLM2). The loaded model object is handed to ``HFLM``, so per-layer widths need no
``trust_remote_code``.

The standard tasks of the pruning papers (LLM-Pruner, MoreauPruner) are BoolQ, PIQA, HellaSwag,
WinoGrande, ARC-easy, ARC-challenge and OpenBookQA (``--tasks paper``). Their datasets come from
the Hugging Face hub; nothing is downloaded unless ``allow_download`` is set, so they run where
the local datasets cache already has them and otherwise fail with an error naming the task. Local
task YAMLs (lm-eval's ``include_path``) run fully offline.

Accuracies (``acc``, and ``acc_norm`` where the task defines it, each with its standard error)
go into a JSON report and, for a directory with a ``pruning_info.json``, into that file under
``"zero_shot"``.

The extra ``eval`` provides lm-eval: ``pip install moreau-kernels[eval]``.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..io.atomic import write_json

__all__ = [
    "PAPER_TASKS",
    "UnknownTaskError",
    "TaskDataUnavailable",
    "require_lm_eval",
    "parse_tasks",
    "hub_offline",
    "evaluate_zero_shot",
    "write_into_pruning_info",
    "format_table",
]

#: The zero-shot tasks of LLM-Pruner's and MoreauPruner's tables (lm-eval task names).
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
INSTALL_HINT = "pip install moreau-kernels[eval]"
#: The metrics reported per task (each with ``<metric>_stderr``), when the task has them.
ACCURACY_METRICS = ("acc", "acc_norm")
ZERO_SHOT_KEY = "zero_shot"


class UnknownTaskError(ValueError):
    """A task name that neither lm-eval nor the include paths define."""


class TaskDataUnavailable(RuntimeError):
    """A task whose dataset cannot be read here (not in the local cache, missing file, ...)."""


def require_lm_eval():
    """Imports lm-eval, or raises ImportError saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the wrapper we need)
    except ImportError as e:
        raise ImportError(
            f"zero-shot evaluation needs lm-evaluation-harness: `{INSTALL_HINT}` (or `pip install lm-eval`); "
            f"importing it failed: {e}"
        ) from e
    return lm_eval


def parse_tasks(spec: str | Iterable[str]) -> list[str]:
    """Task names from ``"boolq,piqa"`` (or a list); ``paper`` expands to :data:`PAPER_TASKS`.

    Order is kept, duplicates dropped; an empty list is an error.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        part = part.strip()
        for name in PAPER_TASKS if part == "paper" else [part] if part else []:
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"no task names in {spec!r}: give e.g. --tasks piqa,arc_easy or --tasks paper")
    return names


@contextlib.contextmanager
def hub_offline(enabled: bool = True):
    """While active, ``datasets`` and ``huggingface_hub`` make no network calls.

    Sets ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and, since both libraries read them once at
    import, also their module-level flags; everything is restored on exit.
    """
    if not enabled:
        yield
        return
    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    patched: list[tuple[Any, str, Any]] = []
    try:
        for k in env_keys:
            os.environ[k] = "1"
        import datasets.config
        import huggingface_hub.constants

        for module, attr in ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                             (datasets.config, "HF_DATASETS_OFFLINE")):
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _lm_eval_logging(verbose: bool):
    """lm-eval logs every step at INFO and warns about things we do on purpose (a model object,
    zero shots); without ``verbose`` only its errors show."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


# --------------------------------------------------------------------------- tasks


def resolve_include_paths(include_path) -> list[str]:
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--include-path {p} is not a directory (it should hold task YAML files)")
        out.append(str(path.resolve()))
    return out


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


_FULL_MANAGERS: dict[tuple[str, ...], Any] = {}


def _task_manager(names: Sequence[str], include_paths: list[str]):
    """lm-eval's TaskManager; only the include paths are indexed when they define every task.

    Indexing lm-eval's thousands of built-in YAMLs takes seconds, so that index is built once per
    process and set of include paths (it maps names to YAML files; the YAMLs themselves are read
    again whenever a task is built).
    """
    from lm_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(n in local.all_tasks or _is_yaml_path(n) for n in names):
            return local
    key = tuple(include_paths)
    if key not in _FULL_MANAGERS:
        _FULL_MANAGERS[key] = TaskManager(include_path=include_paths or None)
    return _FULL_MANAGERS[key]


def _check_known(names: Sequence[str], manager, include_paths: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not _is_yaml_path(n)]
    if not unknown:
        return
    lines = []
    for n in unknown:
        close = difflib.get_close_matches(n, known, n=3, cutoff=0.75)
        lines.append(f"unknown task {n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = "lm-eval's built-in tasks" + (f" and the YAML files under {', '.join(include_paths)}" if include_paths
                                          else "")
    raise UnknownTaskError(
        "; ".join(lines) + f". Known tasks are {where}; list them with `lm-eval ls tasks`, "
        "add your own with --include-path DIR."
    )


def _is_offline_error(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionError) or type(e).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_tasks(names: Sequence[str], manager, allow_download: bool) -> list:
    """Builds every task (which reads its dataset) one by one, so a failure names its task.

    Returns what ``simple_evaluate`` accepts: the built Task/Group objects with lm-eval's
    ``TaskManager.load``, else the names (older lm-eval builds them again).
    """
    built: list = []
    for name in names:
        try:
            if hasattr(manager, "load"):
                loaded = manager.load([name])
                if name in loaded.get("groups", {}):
                    built.append(loaded["groups"][name])
                elif name in loaded["tasks"]:
                    built.append(loaded["tasks"][name])
                else:  # a tag, or a YAML path: the leaf tasks it names
                    built.extend(loaded["tasks"].values())
            else:
                from lm_eval.tasks import get_task_dict

                get_task_dict([name], manager)
                built.append(name)
        except Exception as e:  # lm-eval and datasets raise many types; each is reported with its task
            if _is_offline_error(e):
                hint = ("downloads are off (this tool never downloads unless --allow-download is given)"
                        if not allow_download else "the hub could not be reached")
                raise TaskDataUnavailable(
                    f"task {name!r}: its dataset is not in the local Hugging Face datasets cache and {hint}. "
                    f"Run it once with --allow-download on a machine with network (the cache then serves it "
                    f"offline), or evaluate a local task with --include-path DIR. ({type(e).__name__}: {e})"
                ) from e
            if isinstance(e, FileNotFoundError):
                raise TaskDataUnavailable(
                    f"task {name!r}: a data file is missing: {e}. Relative data_files in a task YAML are read "
                    f"from the current directory ({Path.cwd()}); run from the directory they are relative to "
                    "or make them absolute."
                ) from e
            raise TaskDataUnavailable(f"task {name!r} could not be loaded: {type(e).__name__}: {e}") from e
    return built


# --------------------------------------------------------------------------- evaluation


def _check_settings(num_fewshot, batch_size, limit) -> None:
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                              or (isinstance(limit, float) and limit > 1)):
        raise ValueError(f"limit must be a positive number of documents or a fraction in (0, 1], got {limit!r}")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _summarise(out: dict, log_samples: bool) -> dict:
    """Per task: acc/acc_norm with stderr, every other numeric metric, the number of documents."""
    tasks: dict[str, dict] = {}
    n_samples = out.get("n-samples", {})
    n_shot = out.get("n-shot", {})
    for task, metrics in out["results"].items():
        entry: dict[str, Any] = {}
        other: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key:
                continue
            metric, _filter = key.split(",", 1)
            if metric in ACCURACY_METRICS or metric.removesuffix("_stderr") in ACCURACY_METRICS:
                entry[metric] = _number(value)
            elif _number(value) is not None:
                other[key] = _number(value)
        if other:
            entry["other_metrics"] = other
        counts = n_samples.get(task, {})
        if counts:
            entry["n"] = counts.get("effective")
            entry["n_total"] = counts.get("original")
        if task in n_shot:
            entry["num_fewshot"] = n_shot[task]
        tasks[task] = entry
    result: dict[str, Any] = {"tasks": tasks}
    if log_samples:
        result["samples"] = {
            task: [{"doc_id": s["doc_id"], "target": s["target"],
                    "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]} for s in samples]
            for task, samples in out.get("samples", {}).items()
        }
    return result


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_fewshot: int = 0,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    seed: int = 0,
    allow_download: bool = False,
    log_samples: bool = False,
    verbose: bool = False,
) -> dict:
    """Zero-shot (or few-shot) accuracy of ``model`` on lm-eval ``tasks``.

    ``model``: a loaded causal LM (e.g. from :func:`moreau_pruner.model.loading.load_model`), evaluated on
    its own device and dtype; ``tokenizer``: its tokenizer. ``tasks``: names or ``"a,b"``
    (``paper`` = :data:`PAPER_TASKS`). ``include_path``: directories of extra task YAMLs.
    ``limit``: at most this many documents per task (a float in (0, 1]: that fraction) -- for
    quick checks only, the accuracy is then not the task's. Nothing is downloaded unless
    ``allow_download``. ``log_samples`` adds per-document log-likelihoods of every choice.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", ...}},
    "settings": {...}, "lm_eval_version": ..., "time_s": ...}`` (plus ``"samples"``).
    Raises :class:`UnknownTaskError`, :class:`TaskDataUnavailable`, ImportError (lm-eval missing)
    or ValueError (bad settings), each naming the problem.
    """
    names = parse_tasks(tasks)
    _check_settings(num_fewshot, batch_size, limit)
    if tokenizer is None:
        raise ValueError("evaluation needs the model's tokenizer, and none was given (the directory has none?)")
    include_paths = resolve_include_paths(include_path)
    lm_eval = require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    with hub_offline(not allow_download), _lm_eval_logging(verbose):
        manager = _task_manager(names, include_paths)
        _check_known(names, manager, include_paths)
        specs = _load_tasks(names, manager, allow_download)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=log_samples,
        )
    result = _summarise(out, log_samples)
    result["settings"] = {"num_fewshot": num_fewshot, "batch_size": batch_size, "limit": limit, "seed": seed,
                          "include_path": include_paths or None}
    result["lm_eval_version"] = getattr(lm_eval, "__version__", None)
    result["time_s"] = round(time.perf_counter() - t0, 2)
    return result


# --------------------------------------------------------------------------- writing results


def write_into_pruning_info(directory: str | os.PathLike, report: dict) -> Path | None:
    """Merges ``report``'s per-task results into ``directory/pruning_info.json`` under
    ``"zero_shot"`` (results of other tasks already there are kept; a task evaluated again is
    replaced). Returns the file, or None when the directory has no ``pruning_info.json``."""
    from ..io.pruned import PRUNING_INFO_FILE

    path = Path(directory) / PRUNING_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the zero-shot results were not written into it") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path} does not hold a JSON object; the zero-shot results were not written into it")
    section = info.get(ZERO_SHOT_KEY)
    section = dict(section) if isinstance(section, dict) else {}
    common = {k: report[k] for k in ("settings", "lm_eval_version", "date", "dtype", "device") if k in report}
    for task, entry in report["tasks"].items():
        section[task] = {**entry, **common}
    info[ZERO_SHOT_KEY] = section
    write_json(path, info)
    return path


def format_table(report: dict) -> str:
    def cell(entry, metric):
        v, se = entry.get(metric), entry.get(f"{metric}_stderr")
        if v is None:
            return "-"
        return f"{100 * v:.2f} ± {100 * se:.2f}" if se is not None else f"{100 * v:.2f}"

    rows = [("task", "acc %", "acc_norm %", "n")]
    for task, entry in report["tasks"].items():
        rows.append((task, cell(entry, "acc"), cell(entry, "acc_norm"), str(entry.get("n", "?"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
