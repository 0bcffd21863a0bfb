"""The code that runs in Slicer's Python keeps to the oldest supported Slicer's Python.

Slicer 5.8 ships Python 3.9.10 (`VCMSynthesisLib.MINIMUM_PYTHON`): the module, the Lib and the
batch script must run there, while training and the tests run in the 3.10+ development venv.
`vermin` reads the code and computes the minimum Python it needs; every file that names a Slicer
or Python version names the same minimum.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import VCMSynthesisLib
from VCMSynthesisLib import MINIMUM_PYTHON, MINIMUM_SLICER

MODULE_DIR = Path(__file__).resolve().parents[2]
REPO_DIR = MODULE_DIR.parent
VERMIN = "import sys; from vermin import main; sys.exit(main())"
FUTURE_ANNOTATIONS = "from __future__ import annotations"


def slicer_side_files() -> list[Path]:
    """Everything Slicer's Python (or PythonSlicer, the default worker) runs."""
    files = [MODULE_DIR / "VCMSynthesis.py", *sorted((MODULE_DIR / "VCMSynthesisLib").rglob("*.py")),
             *sorted((MODULE_DIR / "Resources" / "Scripts").rglob("*.py"))]
    assert len(files) > 10
    return files


class _WithoutAnnotations(ast.NodeTransformer):
    """Drops annotations, which `from __future__ import annotations` leaves unevaluated."""

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def _function(self, node):
        node.returns = None
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.Assign:
        return ast.Assign(targets=[node.target], value=node.value or ast.Constant(None))


def vermin_minimum(paths: list[Path]) -> tuple[tuple[int, int], str]:
    """vermin's minimum Python 3 version of `paths` (union types `X | Y` included), and its report."""
    completed = subprocess.run(
        [sys.executable, "-c", VERMIN, "--no-tips", "--format", "parsable", "--feature", "union-types",
         "--eval-annotations", *map(str, paths)], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    python3 = completed.stdout.strip().splitlines()[-1].split(":")[4]  # ":::!2:3.10:"; "~3": any 3.x
    version = (python3.lstrip("~!").split(".") + ["0"])[:2]
    return (int(version[0]), int(version[1])), completed.stdout


def test_slicer_side_code_runs_on_the_oldest_supported_slicers_python(tmp_path):
    pytest.importorskip("vermin")
    # With postponed annotations, only what runs counts: vermin reads a copy without annotations
    # (its union-type check cannot tell them apart); other files are read as they are, annotations
    # evaluated (a parameterNodeWrapper class reads its annotations at run time).
    checked = []
    for path in slicer_side_files():
        text = path.read_text(encoding="utf-8")
        if FUTURE_ANNOTATIONS in text:
            tree = ast.fix_missing_locations(_WithoutAnnotations().visit(ast.parse(text)))
            copy = tmp_path / f"{len(checked)}_{path.name}"
            copy.write_text(ast.unparse(tree), encoding="utf-8")
            checked.append(copy)
        else:
            checked.append(path)
    minimum, report = vermin_minimum(checked)
    assert minimum <= MINIMUM_PYTHON, report


def test_the_check_catches_what_python_3_9_lacks(tmp_path):
    """The test above can fail: each of these needs 3.10."""
    pytest.importorskip("vermin")
    for source in ("pairs = list(zip([1], [2], strict=True))\n",
                   "def f(x):\n    return isinstance(x, int | str)\n",
                   "def f(x: int | None):\n    return x\n",
                   "match 1:\n    case 1:\n        pass\n"):
        path = tmp_path / "newer.py"
        path.write_text(source, encoding="utf-8")
        assert vermin_minimum([path])[0] >= (3, 10), source


def test_every_file_names_the_same_minimum():
    python = ".".join(map(str, MINIMUM_PYTHON))
    project = (REPO_DIR / "pyproject.toml").read_text(encoding="utf-8")
    assert re.findall(r'^requires-python = "(.*)"$', project, flags=re.MULTILINE) == [f">={python}"]
    assert re.findall(r'^target-version = "(.*)"$', project, flags=re.MULTILINE) == [
        f"py{python.replace('.', '')}"]
    readme = (REPO_DIR / "README.md").read_text(encoding="utf-8")
    assert f"Install 3D Slicer {MINIMUM_SLICER} or later" in readme
    assert f"Slicer {MINIMUM_SLICER}'s" in readme or f"{MINIMUM_SLICER}\n   ships Python {python}" in readme
    cmake = (REPO_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.findall(r'set\(VCMSynthesis_MINIMUM_SLICER "([\d.]+)"\)', cmake) == [MINIMUM_SLICER]
    # Slicer's catalogue entry schema allows no version field: the ExtensionsIndex branch of each
    # Slicer release decides where the extension is built; the entry must not claim one.
    catalogue = (REPO_DIR / "VCMSynthesis.json").read_text(encoding="utf-8")
    assert not re.search(r"\b\d+\.\d+\b", catalogue.replace("v1.0.1", ""))
    every_mention = re.findall(r"Slicer (\d+\.\d+) or later", readme + cmake)
    assert set(every_mention) == {MINIMUM_SLICER}


def test_an_older_python_gets_one_line_naming_the_minimum_slicer(monkeypatch):
    monkeypatch.setattr(VCMSynthesisLib.sys, "version_info", (3, 8, 18, "final", 0))
    message = VCMSynthesisLib.unsupported_python_message()
    assert message is not None and "\n" not in message
    assert f"Slicer {MINIMUM_SLICER} or later" in message
    monkeypatch.undo()
    assert VCMSynthesisLib.unsupported_python_message() is None


def test_the_worker_refuses_an_older_python_in_one_line(tmp_path):
    """`python -m VCMSynthesisLib` on a Python that reports 3.8: one error line, exit 1."""
    sitecustomize = tmp_path / "sitecustomize.py"
    sitecustomize.write_text("import sys\nsys.version_info = (3, 8, 18, 'final', 0)\n", encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-m", "VCMSynthesisLib", "models"], capture_output=True, text=True, check=False,
        env={"PYTHONPATH": f"{tmp_path}:{MODULE_DIR}", "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: VCM Synthesis needs Slicer {MINIMUM_SLICER} or later")
    assert completed.stdout == ""


def installed_python(version: str) -> str | None:
    """A real Python `version` ("3.9") on this machine (PATH or pyenv), if there is one."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python"))
    candidates.append(shutil.which(f"python{version}"))
    runs = (path for path in candidates if path and subprocess.run(
        [path, "-c", "pass"], capture_output=True, check=False).returncode == 0)  # pyenv shims may not
    return next(runs, None)


def test_the_torch_free_commands_run_on_a_real_python_3_9_and_3_8_is_refused():
    """Where a real 3.9 is installed: the catalogue runs on it (no torch needed); 3.8 gets one line."""
    oldest = installed_python(".".join(map(str, MINIMUM_PYTHON)))
    if oldest is None:
        pytest.skip(f"no Python {MINIMUM_PYTHON} installed here (vermin checks the code without it)")
    listed = subprocess.run([oldest, "-B", "-m", "VCMSynthesisLib", "models"], capture_output=True, text=True,
                            check=False, cwd=MODULE_DIR, env={"PYTHONPATH": str(MODULE_DIR)})
    assert listed.returncode == 0, listed.stderr
    assert "demo-superres" in listed.stdout
    older = installed_python(f"{MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1] - 1}")
    if older is not None:
        refused = subprocess.run([older, "-B", "-m", "VCMSynthesisLib", "models"], capture_output=True,
                                 text=True, check=False, cwd=MODULE_DIR, env={"PYTHONPATH": str(MODULE_DIR)})
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"error: VCM Synthesis needs Slicer {MINIMUM_SLICER} or later")


def test_check_dependencies_refuses_a_worker_python_older_than_the_minimum():
    """Set-up > Worker Python set to a real 3.8: one line at *Check dependencies*, not at the run."""
    from VCMSynthesisLib import jobs
    from VCMSynthesisLib.errors import UserError

    older = installed_python(f"{MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1] - 1}")
    if older is None:
        pytest.skip("no older Python installed here")
    with pytest.raises(UserError, match=r"is Python 3\.8\.\d+; VCM Synthesis needs Python 3\.9 or later"):
        jobs.probe_worker_python(older)
    assert jobs.probe_worker_python(sys.executable).torch_version  # this one passes
