"""The package is strictly typed and lint-clean; CI checks it through the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict() -> None:
    """The package, and the code that uses it (tests, examples, benchmarks), as users would."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "kvmflow", "tests", "examples", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "kvmflow", "tests", "benchmarks", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_error_tree_is_the_package_tree() -> None:
    from kvmflow.errors import error_tree

    readme = (ROOT / "README.md").read_text()
    assert f"```\n{error_tree()}\n```" in readme


def test_every_error_class_lives_in_kvmflow_errors() -> None:
    import importlib
    import pkgutil

    import kvmflow
    from kvmflow.errors import KvmflowError

    elsewhere = []
    for module in pkgutil.walk_packages(kvmflow.__path__, "kvmflow."):
        if module.name.endswith("__main__") or module.name == "kvmflow.cli.main":
            continue
        loaded = importlib.import_module(module.name)
        for value in vars(loaded).values():
            if (
                isinstance(value, type)
                and issubclass(value, KvmflowError)
                and value.__module__ != "kvmflow.errors"
            ):
                elsewhere.append(f"{value.__module__}.{value.__name__}")
    assert elsewhere == []
