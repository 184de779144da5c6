"""Import a script from bench/ (bench/ is not a package that tests import from)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script(name: str):
    """bench/<name>.py as a module named aecore_bench_<name>."""
    spec = importlib.util.spec_from_file_location(f"aecore_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
