"""The pipeline imports a task's module afresh from its code directory (``importable``): a
long-lived control plane sees a task edited since its last run, and two code directories with
a module of the same name each get their own."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from deploy.pipeline.runner import importable


def _value(paths: list[Path], module: str) -> int:
    with importable([str(p) for p in paths]):
        return int(importlib.import_module(module).VALUE)


def test_an_edited_module_is_imported_as_it_is_now(tmp_path: Path) -> None:
    code = tmp_path / "one"
    code.mkdir()
    (code / "kloop_test_task_mod.py").write_text("VALUE = 1\n")
    assert _value([code], "kloop_test_task_mod") == 1
    (code / "kloop_test_task_mod.py").write_text("VALUE = 22\n")
    assert _value([code], "kloop_test_task_mod") == 22
    assert str(code) not in sys.path


def test_two_directories_with_the_same_module_name_get_their_own(tmp_path: Path) -> None:
    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kloop_test_same_name.py").write_text(f"VALUE = {value}\n")
    assert _value([tmp_path / "a"], "kloop_test_same_name") == 1
    assert _value([tmp_path / "b"], "kloop_test_same_name") == 2
    assert _value([tmp_path / "a"], "kloop_test_same_name") == 1


def test_installed_packages_under_the_directory_stay_imported(tmp_path: Path) -> None:
    """A checkout with its venv inside (kloop's own, as the README sets it up) is a fine code
    directory: the installed packages it holds are not imported again."""
    import aiohttp

    venv_root = Path(aiohttp.__file__).resolve().parents[4]  # <venv>/lib/pythonX/site-packages
    before = sys.modules["aiohttp"]
    with importable([str(venv_root)]):
        pass
    assert sys.modules["aiohttp"] is before
