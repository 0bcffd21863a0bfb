"""Background runs of the worker CLI: a job folder, a child process, its JSON-lines progress.

Slicer must stay responsive while a model samples for minutes, and a crash or a Cancel must
never touch the scene. So the GUI (and the batch script) write the conditions into a job
folder, start `python -m VCMSynthesisLib <command> ... --progress json` as a separate process
in its own process group, and read its stdout on a thread into a queue that a QTimer (or a
plain loop) polls. Qt-free, so the same code runs in Slicer, in the batch script and in pytest.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from VCMSynthesisLib import MINIMUM_PYTHON, MINIMUM_SLICER
from VCMSynthesisLib.errors import EXIT_SIGINT, EXIT_SIGTERM, Cancelled, UserError
from VCMSynthesisLib.files import atomic_path

LIB_PARENT = Path(__file__).resolve().parent.parent
JOB_DESCRIPTION = "job.json"
LOG_NAME = "worker.log"
RESULT_NAME = "result.nrrd"
PREVIEW_NAME = "preview.nrrd"
UNCERTAINTY_NAME = "uncertainty.nrrd"
TERMINATE_GRACE_S = 5.0


@dataclass(frozen=True)
class Job:
    """A worker command line and the folder that holds its inputs, result and log.

    Args:
        folder: job folder; the conditions are written here before the run.
        arguments: the `vcm-synthesis` arguments after the program name, e.g.
            `["synthesize", "--model", "demo", ...]`, without `--progress`.
        output: the file the worker writes on success.
    """

    folder: Path
    arguments: list[str]
    output: Path

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_NAME

    def remove_data(self) -> None:
        """Delete the condition files and the result, keeping `job.json` and the log (Show log)."""
        for path in self.folder.iterdir():
            if path.name not in (JOB_DESCRIPTION, LOG_NAME) and path.is_file():
                path.unlink()

    def write_description(self) -> Path:
        """Write `job.json`, so that a failed run can be repeated by hand from the log folder."""
        path = self.folder / JOB_DESCRIPTION
        description = {"arguments": self.arguments, "output": str(self.output)}
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(description, indent=2))
        return path


def new_job_folder(parent: str | Path | None = None) -> Path:
    """A fresh, empty job folder (under the system temp folder unless `parent` is given)."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="vcm-job-", dir=parent))


def synthesis_job(
    folder: Path,
    *,
    model: str,
    segmentation: Path | None,
    modalities: dict[str, Path] | None = None,
    output: Path | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int | None = None,
    strength: float | None = None,
    device: str = "auto",
    preview_every: int | None = None,
    samples: int | None = None,
    label_map: str | Path | None = None,
    unmapped: str | None = None,
) -> Job:
    """The `vcm-synthesis synthesize` job for conditions already written into `folder`.

    `preview_every` N: a live preview every N steps, written to `folder/preview.nrrd`
    (announced in `WorkerRun.preview`). `samples` K >= 2: the mean of K draws, and their spread
    in `folder/uncertainty.nrrd` (`Outcome.uncertainty`). `label_map` / `unmapped`: the
    worker's `--label-map` (a preset name or a JSON file) and `--unmapped`. `steps`,
    `scheduler`, `seed` and `strength`: None leaves the worker's default (the model's).
    """
    output = Path(output) if output is not None else folder / RESULT_NAME
    arguments = ["synthesize", "--model", str(model)]
    if segmentation is not None:
        arguments += ["--segmentation", str(segmentation)]
    if label_map is not None:
        arguments += ["--label-map", str(label_map)]
    if unmapped is not None:
        arguments += ["--unmapped", unmapped]
    for name, path in (modalities or {}).items():
        arguments += ["--modality", f"{name}={path}"]
    arguments += ["--output", str(output), "--device", device]
    if steps is not None:
        arguments += ["--steps", str(int(steps))]
    if scheduler is not None:
        arguments += ["--scheduler", scheduler]
    if seed is not None:
        arguments += ["--seed", str(int(seed))]
    if strength is not None:
        arguments += ["--strength", repr(float(strength))]
    if preview_every is not None:
        arguments += ["--preview", str(Path(folder) / PREVIEW_NAME),
                      "--preview-every", str(int(preview_every))]
    return Job(folder=Path(folder), arguments=arguments + _samples_arguments(folder, samples), output=output)


def _samples_arguments(folder: Path, samples: int | None) -> list[str]:
    """`--samples K`, and from 2 samples on their spread in the job folder."""
    if samples is None:
        return []
    arguments = ["--samples", str(int(samples))]
    if samples >= 2:
        arguments += ["--uncertainty", str(Path(folder) / UNCERTAINTY_NAME)]
    return arguments


def superres_job(
    folder: Path,
    *,
    input_path: Path,
    output: Path | None = None,
    model: str | None = None,
    spacing: float | None = None,
    samples: int | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int | None = None,
    device: str = "auto",
) -> Job:
    """The `vcm-synthesis superres` job (axial super-resolution of a thick-slice scan)."""
    output = Path(output) if output is not None else folder / RESULT_NAME
    arguments = ["superres", "--input", str(input_path), "--output", str(output), "--device", device]
    options = (("--model", model), ("--spacing", spacing), ("--samples", samples), ("--steps", steps),
               ("--scheduler", scheduler), ("--seed", seed))
    for flag, value in options:
        if value is not None:
            arguments += [flag, str(value)]
    return Job(folder=Path(folder), arguments=arguments, output=output)


def edit_job(
    folder: Path,
    *,
    model: str,
    image: Path,
    segmentation: Path,
    original_segmentation: Path | None = None,
    region: Path | None = None,
    output: Path | None = None,
    margin_mm: float | None = None,
    samples: int | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int | None = None,
    strength: float | None = None,
    device: str = "auto",
    label_map: str | Path | None = None,
    unmapped: str | None = None,
) -> Job:
    """The `vcm-synthesis edit` job: re-synthesize where `segmentation` differs from
    `original_segmentation`, or the non-zero voxels of `region` (`label_map`, `unmapped`: as
    for `synthesis_job`)."""
    output = Path(output) if output is not None else folder / RESULT_NAME
    arguments = ["edit", "--model", str(model), "--image", str(image), "--segmentation", str(segmentation)]
    options = (("--original-segmentation", original_segmentation), ("--region", region), ("--output", output),
               ("--device", device), ("--margin-mm", margin_mm), ("--steps", steps),
               ("--scheduler", scheduler), ("--seed", seed),
               ("--strength", strength), ("--label-map", label_map), ("--unmapped", unmapped))
    for flag, value in options:
        if value is not None:
            arguments += [flag, str(value)]
    return Job(folder=Path(folder), arguments=arguments + _samples_arguments(folder, samples), output=output)


def default_python() -> str:
    """Slicer's `PythonSlicer` when running inside Slicer, else this interpreter."""
    slicer_python = shutil.which("PythonSlicer")
    if slicer_python is None:
        candidate = Path(sys.executable).with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
        slicer_python = str(candidate) if candidate.is_file() else None
    return slicer_python or sys.executable


REQUIREMENTS_FILE = Path(__file__).resolve().with_name("requirements.txt")
_IMPORT_NAMES = {"pynrrd": "nrrd"}  # distributions imported under another name


def _worker_requirements() -> dict[str, str]:
    """Import name -> pip requirement, from `requirements.txt` (pyproject.toml's dependencies too)."""
    requirements = {}
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        requirement = line.strip()
        if requirement and not requirement.startswith("#"):
            distribution = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
            requirements[_IMPORT_NAMES.get(distribution, distribution)] = requirement
    return requirements


#: What the worker needs beyond the standard library: import name -> pip requirement.
WORKER_REQUIREMENTS = _worker_requirements()

_PROBE = """
import importlib.util, json, sys
missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
found = {"missing": missing, "torch": None, "cuda": False, "gpu": None, "version": list(sys.version_info[:3])}
if "torch" not in missing:
    import torch
    found["torch"] = torch.__version__
    found["cuda"] = bool(torch.cuda.is_available())
    found["gpu"] = torch.cuda.get_device_name(0) if found["cuda"] else None
print(json.dumps(found))
"""


@dataclass(frozen=True)
class WorkerEnvironment:
    """What a worker Python has: missing requirements, the torch version and whether CUDA works."""

    python: str
    missing: list[str]
    torch_version: str | None
    cuda: bool
    gpu: str | None

    @property
    def missing_requirements(self) -> list[str]:
        return [WORKER_REQUIREMENTS[name] for name in self.missing]

    def summary(self) -> str:
        """One line for the panel and the batch log."""
        if self.missing:
            return f"missing in '{self.python}': {', '.join(self.missing_requirements)}"
        if self.cuda:
            return f"ready: torch {self.torch_version} with CUDA on {self.gpu}"
        return (
            f"ready: torch {self.torch_version}, CPU only (no CUDA GPU visible): synthesis works but "
            "takes minutes per volume"
        )


def probe_worker_python(python: str | None = None, timeout_s: float = 120.0) -> WorkerEnvironment:
    """Ask a Python executable (in a child process, so Slicer never imports torch) what it has."""
    python = python or default_python()
    try:
        completed = subprocess.run(
            [python, "-c", _PROBE, *WORKER_REQUIREMENTS], capture_output=True, text=True, timeout=timeout_s,
            check=False,
        )
        found = json.loads(completed.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        raise UserError(
            f"the worker Python '{python}' does not run ({error}); choose another one in the module's Set-up"
        ) from error
    if tuple(found["version"][:2]) < MINIMUM_PYTHON:
        version, minimum = ".".join(map(str, found["version"])), ".".join(map(str, MINIMUM_PYTHON))
        raise UserError(
            f"the worker Python '{python}' is Python {version}; VCM Synthesis needs Python {minimum} "
            f"or later (that of Slicer {MINIMUM_SLICER}): choose another one in the module's Set-up"
        )
    return WorkerEnvironment(
        python=python, missing=found["missing"], torch_version=found["torch"], cuda=found["cuda"],
        gpu=found["gpu"],
    )


@dataclass(frozen=True)
class Progress:
    """One sampling step done: `step` of `total`, seconds elapsed and estimated remaining.

    The worker's JSON progress line (`{"step", "total", "elapsed_s", "eta_s"}`) is this, written
    by `line()` (`runtime.JsonProgress`, the server) and read by `from_line` (worker runs, remote
    runs, the batch script).
    """

    step: int
    total: int
    elapsed_s: float
    eta_s: float | None

    @classmethod
    def after(cls, step: int, total: int, elapsed_s: float) -> Progress:
        """Step `step` of `total` done after `elapsed_s`; the rest estimated at the same pace."""
        return cls(step, total, round(elapsed_s, 3), round(elapsed_s / step * (total - step), 3))

    @classmethod
    def from_line(cls, line: dict) -> Progress | None:
        """The progress a JSON line reports, or None for any other line."""
        if "step" not in line or "total" not in line or "preview" in line:
            return None
        eta_s = line.get("eta_s")
        return cls(int(line["step"]), int(line["total"]), float(line.get("elapsed_s") or 0.0),
                   None if eta_s is None else float(eta_s))

    def line(self) -> dict:
        return {"step": self.step, "total": self.total, "elapsed_s": self.elapsed_s, "eta_s": self.eta_s}

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


@dataclass(frozen=True)
class Outcome:
    """How a run ended: `status` is "succeeded", "failed" or "cancelled"."""

    status: str
    result: Path | None = None
    message: str = ""
    log_path: Path | None = None
    timings: dict = field(default_factory=dict)
    exit_code: int | None = None
    warnings: tuple[str, ...] = ()
    uncertainty: Path | None = None  # the per-voxel spread across samples, when one was written

    def raise_for_status(self) -> None:
        """`UserError` (the worker's one line and its log path) on failure, `Cancelled` on cancel."""
        if self.status == "failed":
            raise UserError(f"{self.message} (worker log: {self.log_path})")
        if self.status == "cancelled":
            raise Cancelled(self.exit_code if self.exit_code in (EXIT_SIGINT, EXIT_SIGTERM) else EXIT_SIGTERM)


class WorkerRun:
    """The worker process of one job; started on construction, polled without blocking.

    Args:
        job: the job to run; its description is written into the job folder first.
        python: the Python executable with torch and monai (default: `default_python()`).
    """

    def __init__(self, job: Job, python: str | None = None):
        self.job = job
        self.python = python or default_python()
        self._events: queue.Queue[Progress] = queue.Queue()
        self._result_line: dict | None = None
        self._error_line: str | None = None
        self.warnings: list[str] = []  # the worker's {"warning": ...} lines, as they come
        self.preview: tuple[Path, int] | None = None  # the latest {"preview": path, "step"} line
        self._cancel_requested = False
        self._outcome: Outcome | None = None
        job.folder.mkdir(parents=True, exist_ok=True)
        job.write_description()
        self._log = open(job.log_path, "a", encoding="utf-8")  # closed in _finish
        command = [self.python, "-u", "-m", "VCMSynthesisLib", *job.arguments, "--progress", "json"]
        self._log.write("$ " + subprocess.list2cmdline(command) + "\n")
        self._log.flush()
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(LIB_PARENT)] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else [])
        )
        environment["PYTHONUNBUFFERED"] = "1"
        group = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
            if os.name == "nt"
            else {"start_new_session": True}
        )
        try:
            self._process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=self._log,
                stdin=subprocess.DEVNULL,
                cwd=job.folder,
                env=environment,
                text=True,
                encoding="utf-8",
                errors="replace",
                **group,
            )
        except OSError as error:
            self._log.close()
            raise UserError(
                f"cannot start the worker Python '{self.python}' ({error.strerror}); "
                "choose a Python executable with torch and monai in the module settings"
            ) from error
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            self._log.write(line)
            self._log.flush()
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(message, dict):
                continue
            if "warning" in message:
                self.warnings.append(str(message["warning"]))
            elif "error" in message:
                self._error_line = str(message["error"])
            elif "result" in message:
                self._result_line = message
            elif "preview" in message:
                self.preview = (Path(message["preview"]), int(message.get("step") or 0))
            elif (progress := Progress.from_line(message)) is not None:
                self._events.put(progress)

    def poll(self) -> list[Progress]:
        """Progress reported since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def pid(self) -> int:
        """The worker's process ID, which is also its process group ID (POSIX)."""
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._outcome is None and (self._process.poll() is None or self._reader.is_alive())

    def outcome(self) -> Outcome | None:
        """The outcome once the process has exited and its output is read, else None."""
        if self._outcome is None and not self.running:
            self._finish()
        return self._outcome

    def wait(self, timeout: float | None = None) -> Outcome:
        """Block until the worker exits (raises `TimeoutError` after `timeout` seconds)."""
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired as expired:
            raise TimeoutError(f"the worker is still running after {timeout} s") from expired
        self._reader.join()
        return self.outcome()

    def cancel(self) -> None:
        """Stop the worker and all its children: SIGTERM to the group, SIGKILL after a grace time."""
        self._cancel_requested = True
        if self._process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True, check=False
            )
            return
        try:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _finish(self) -> None:
        code = self._process.returncode
        self._log.close()
        log_path = self.job.log_path
        failure = None if code == 0 else self._error_line or _last_error_line(log_path)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"exit code {code}\n")
        if self._cancel_requested or code in (EXIT_SIGINT, EXIT_SIGTERM, -signal.SIGTERM, -signal.SIGKILL):
            self._outcome = Outcome("cancelled", message="cancelled", log_path=log_path, exit_code=code)
        elif code == 0 and self.job.output.is_file():
            timings = (self._result_line or {}).get("timings") or {}
            uncertainty = (self._result_line or {}).get("uncertainty")
            self._outcome = Outcome(
                "succeeded", result=self.job.output, log_path=log_path, timings=timings, exit_code=code,
                warnings=tuple(self.warnings), uncertainty=None if uncertainty is None else Path(uncertainty),
            )
        else:
            message = failure or f"the worker stopped with exit code {code} without writing its result"
            self._outcome = Outcome("failed", message=message, log_path=log_path, exit_code=code)


def _last_error_line(log_path: Path) -> str | None:
    """The worker's one-line `error: ...` message (or a traceback's last line) from its log."""
    lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith(("$ ", "{"))]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    return lines[-1] if lines else None


def run_job(job: Job, python: str | None = None, on_progress=None, poll_interval_s: float = 0.2) -> Outcome:
    """Run a job to the end in this thread (batch and tests); Ctrl+C cancels the worker too.

    Returns the successful outcome; raises `UserError` (with the log path) on failure and
    `Cancelled` on cancel.
    """
    run = WorkerRun(job, python=python)
    try:
        while run.running:
            for progress in run.poll():
                if on_progress is not None:
                    on_progress(progress)
            time.sleep(poll_interval_s)
    except KeyboardInterrupt:
        run.cancel()
        run.wait()
        raise Cancelled(EXIT_SIGINT) from None
    for progress in run.poll():
        if on_progress is not None:
            on_progress(progress)
    outcome = run.wait()
    outcome.raise_for_status()
    return outcome
