"""Load a script of benchmarks/ as a module, for the tests of the benchmarks themselves."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str, module_name: str | None = None):
    """``benchmarks/<name>.py`` imported (as ``module_name``, default ``name``); the folder goes on
    sys.path so the scripts' own imports of each other work."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    return mod
