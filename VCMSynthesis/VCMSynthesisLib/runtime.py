"""The runtime of every worker command (`synthesize`, `edit`, `superres`): what they share as
processes, apart from what each computes.

- cancellation: SIGINT/SIGTERM stop a run within `SignalCancellation.GRACE_S` and leave no
  output (exit codes of `errors.py`);
- the JSON lines of `--progress json` on stdout, one object a line, flushed:

      {"step": k, "total": N, "elapsed_s": ..., "eta_s": ...}     after each denoising step
      {"warning": "<one line>"}                                     before the steps, if needed
      {"result": "<output path>", "timings": {...}}                 at the end
      {"error": "<one line>"}                                       on failure (plus the exit code)

  (`jobs.Progress` is the step line, written and read in one place);
- the arguments every sampling command takes and their checks before any work; devices.

Standard library only at import: torch loads inside `resolve_device`, when a run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from VCMSynthesisLib.errors import EXIT_SIGINT, EXIT_SIGTERM, Cancelled, UsageError, UserError
from VCMSynthesisLib.model_config import SAMPLING_SCHEDULERS

#: Where a run may go: "auto" is CUDA when PyTorch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**63 - 1
MAX_SAMPLES = 64  # every sample is held on the output grid until they are averaged


class SignalCancellation:
    """SIGINT/SIGTERM -> `Cancelled` (exit 130/143) within `GRACE_S`, with nothing written.

    The handler raises `Cancelled` at once (the sampler's `should_cancel` also sees the
    request). Python runs handlers only between bytecodes, so a signal that arrives inside one
    long native call (a large model's step on the CPU) waits for it to return. A watchdog
    thread therefore hears the signal through `signal.set_wakeup_fd` (written by the C-level
    handler at once) and ends the process with `os._exit` if it still runs `GRACE_S` later.
    That is safe because nothing is written outside `deferred()` blocks, in which signals are
    only recorded: the write runs to its temporary file and then, before renaming it into place,
    calls `commit()` (`files.AtomicWrites`), so a signal during the write aborts it and leaves
    the previous file, and one after the rename is too late (the run ends as a success).
    Leaving the `with` block stops the watchdog, so in-process callers (tests, batch) are
    never killed.

    Args:
        farewell: called before a watchdog exit (e.g. to print the JSON error line).
    """

    GRACE_S = 1.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, farewell: Callable[[], None] | None = None) -> None:
        self.exit_code: int | None = None
        self.farewell = farewell
        self._deferred = False
        self._committed = False  # an output was renamed into place: too late to cancel this job
        self._deferred_lock = threading.Lock()  # the watchdog never exits inside `deferred()`
        self._closed = threading.Event()
        self._previous_handlers: dict[int, Any] = {}
        self._previous_wakeup_fd = -1
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    def __enter__(self) -> SignalCancellation:
        for signum in self.SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(reader,), name="vcm-cancel-watchdog", daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._closed.set()
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        reader, writer = self._wakeup
        writer.close()  # wakes the watchdog, which then closes the reader
        if isinstance(exc, Cancelled) and self.exit_code not in (None, exc.exit_code):
            # The sampler only sees `should_cancel()`; the exit code says which signal it was.
            raise Cancelled(self.exit_code) from None

    def _handle(self, signum: int, frame) -> None:
        if self.exit_code is None:
            self.exit_code = _exit_code_for(signum)
        if not (self._deferred or self._committed or self._closed.is_set()):
            raise Cancelled(self.exit_code)

    def _watch(self, reader: socket.socket) -> None:
        with reader:
            while not self._closed.is_set():
                try:
                    received = reader.recv(1)
                except OSError:
                    return
                if not received:
                    return  # the `with` block ended
                if received[0] not in self.SIGNALS:
                    continue
                if self._closed.wait(self.GRACE_S):
                    return
                with self._deferred_lock:
                    if self._deferred or self._committed:
                        continue  # the write ends by raising Cancelled (or commits); keep watching
                    if self.farewell is not None:
                        self.farewell()
                    os._exit(self.exit_code or _exit_code_for(received[0]))

    def should_cancel(self) -> bool:
        return self.exit_code is not None

    def raise_if_requested(self) -> None:
        if self.exit_code is not None:
            raise Cancelled(self.exit_code)

    def commit(self) -> None:
        """The last moment to cancel a job, just before its output is renamed into place (the
        `raise_if_cancelled` of its writes): a later signal is only recorded, so that a run
        that replaced its output never reports "cancelled; nothing was written"."""
        with self._deferred_lock:
            self.raise_if_requested()
            self._committed = True

    def next_job(self) -> None:
        """Between the jobs of a batch: a signal recorded after the last commit stops it here."""
        self.raise_if_requested()
        self._committed = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that signals do not interrupt, for writes (a pending request raises before it).

        Its writes pass `commit` as `raise_if_cancelled`, so a signal that arrives during a
        write still cancels it, before the rename."""
        with self._deferred_lock:
            self.raise_if_requested()
            self._deferred = True
        try:
            yield
        finally:
            self._deferred = False


def _exit_code_for(signum: int) -> int:
    return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when PyTorch sees a GPU, else "cpu"; "cuda" without one is an error."""
    import torch

    if name not in DEVICES:
        raise UserError(f"unknown device '{name}'; use one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if cuda else "cpu"
    if name == "cuda" and not cuda:
        raise UserError("device cuda was asked for, but this PyTorch sees no CUDA GPU; "
                        "use --device cpu (or install a CUDA build of PyTorch)")
    return name


def positive_int(text: str, maximum: int = 2**31 - 1) -> int:
    """argparse type of counts (steps, samples): a whole number from 1 to `maximum`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
    return value


def seed_value(text: str) -> int:
    """argparse type of seeds: a whole number from 0 to `MAX_SEED` (what PyTorch's generators take)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED} (2^63 - 1), got {text}")
    return value


def modality_argument(text: str) -> tuple[str, Path]:
    """argparse type of `--modality NAME=FILE`."""
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"must be NAME=FILE (e.g. T2=t2.nrrd), got '{text}'")
    return name, Path(path)


def add_strength_argument(parser: argparse.ArgumentParser) -> None:
    """`--strength W`, the condition strength, as every sampling command takes it."""
    parser.add_argument("--strength", type=float, metavar="W",
                        help="condition strength: 1 as trained, 0 ignores the condition, above 1 follows it "
                             "more closely (default: the model's)")


def add_scheduler_argument(parser: argparse.ArgumentParser) -> None:
    """`--scheduler NAME`, the sampler, as every sampling command takes it (argparse refuses
    other names in one line that lists these)."""
    shown = ", ".join(f"{name} = {label}" for name, label in SAMPLING_SCHEDULERS.items())
    parser.add_argument("--scheduler", choices=SAMPLING_SCHEDULERS,
                        help=f"sampler ({shown}; default: the model's)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`--steps --scheduler --seed --strength --device --progress`, as every sampling command takes them."""
    parser.add_argument("--steps", type=positive_int,
                        help="denoising steps per sample (default: the model's)")
    add_scheduler_argument(parser)
    parser.add_argument("--seed", type=seed_value, default=0,
                        help="random seed of the first sample (default 0)")
    add_strength_argument(parser)
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default auto)")
    parser.add_argument("--progress", choices=("text", "json"), default="text",
                        help="progress bar on stderr, or JSON lines on stdout")


def add_samples_arguments(parser: argparse.ArgumentParser, default: int) -> None:
    """`--samples K` (average K draws) and `--uncertainty FILE` (their per-voxel std)."""
    parser.add_argument("--samples", type=partial(positive_int, maximum=MAX_SAMPLES), default=default,
                        help=f"samples to average (posterior mean; default {default})")
    parser.add_argument("--uncertainty", type=Path, help="also write the per-voxel standard deviation "
                                                         "across samples (needs --samples 2 or more)")


def check_run_outputs(output: Path, inputs: dict[str, Path | None], *, samples: int = 1, seed: int = 0,
                      uncertainty: Path | None = None, preview: Path | None = None) -> None:
    """What every sampling command refuses before any work: seeds and an uncertainty request that
    make no sense, outputs that are one file or any of the `inputs` ({flag: path}), an output that
    cannot be written."""
    from VCMSynthesisLib.files import refuse_overwriting_inputs
    from VCMSynthesisLib.volumes import check_output_writable

    check_samples_arguments(samples, seed, uncertainty, output)
    if preview is not None:
        others = {Path(path).resolve() for path in (output, uncertainty) if path is not None}
        if Path(preview).resolve() in others:
            raise UsageError("--preview names another output; give it a file of its own")
    outputs = {"--output": output, "--uncertainty": uncertainty, "--preview": preview}
    refuse_overwriting_inputs(outputs, inputs)
    check_output_writable(output)
    if preview is not None:
        check_output_writable(preview)


def check_samples_arguments(samples: int, seed: int, uncertainty: Path | None, output: Path) -> None:
    """Refuse seeds past the largest, an uncertainty map without a spread to show or on the
    output's file; check it is writable."""
    from VCMSynthesisLib.volumes import check_output_writable

    if seed + samples - 1 > MAX_SEED:
        raise UsageError(f"--seed {seed} with {samples} samples runs past the largest seed, {MAX_SEED}; "
                         "give a smaller --seed")
    if uncertainty is None:
        return
    if samples < 2:
        raise UsageError("--uncertainty needs --samples 2 or more (one sample has no spread)")
    if uncertainty.resolve() == output.resolve():
        raise UsageError("--uncertainty and --output name the same file; give two different files")
    check_output_writable(uncertainty)

def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """`--server URL --token-file F`: run the command on a `vcm-synthesis serve` (`remote.py`)."""
    parser.add_argument("--server", metavar="URL",
                        help="run on a `vcm-synthesis serve` server (e.g. http://gpu-host:8765) "
                             "instead of here")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="file holding the server's access token (with --server)")


def emit_json(payload: dict[str, Any]) -> None:
    """One JSON object on one line of stdout, flushed at once (the reader is another process)."""
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


class JsonProgress:
    """`{"step", "total", "elapsed_s", "eta_s"}` lines, timed from the first call's setup.

    `emit` receives each line's dict (default: stdout; the server queues them for its client).
    """

    def __init__(self, emit: Callable[[dict[str, Any]], None] = emit_json) -> None:
        self.start = time.perf_counter()
        self.emit = emit

    def __call__(self, step: int, total: int) -> None:
        from VCMSynthesisLib.jobs import Progress

        self.emit(Progress.after(step, total, time.perf_counter() - self.start).line())


class TextProgress:
    """A tqdm bar on stderr."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, step: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr)
        self.bar.update(step - self.bar.n)
        if step == total:
            self.bar.close()


def emit_warning(json_mode: bool, message: str) -> None:
    """`{"warning": ...}` on stdout (JSON mode; readers log it) or a line on stderr."""
    if json_mode:
        emit_json({"warning": message})
    else:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def emit_result(json_mode: bool, output: Path, timings: dict[str, float | None],
                describe: Callable[[dict[str, float]], str], uncertainty: Path | None = None,
                **extra) -> None:
    """A worker command's last line: `{"result", "timings", "uncertainty"?, **extra}` in JSON mode,
    else `wrote OUTPUT (describe(timings))`. Timings are rounded to 0.1 ms, unknown ones left out."""
    timings = {key: round(value, 4) for key, value in timings.items() if value is not None}
    if json_mode:
        payload = {"result": str(output), "timings": timings, **extra}
        if uncertainty is not None:
            payload["uncertainty"] = str(uncertainty)
        emit_json(payload)
    else:
        print(f"wrote {output} ({describe(timings)})")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_worker_command(json_mode: bool, body: Callable[[SignalCancellation], int]) -> int:
    """Runs a worker command (`synthesize`, `superres`) under SIGINT/SIGTERM cancellation.

    In JSON mode every failure also ends stdout with one `{"error": ...}` line, which is what
    the Slicer panel reads; the exception then goes on to `cli.main` for the one-line message
    and exit code.
    """

    def farewell() -> None:
        if json_mode:
            emit_json({"error": "cancelled; nothing was written"})
        print("cancelled: nothing was written", file=sys.stderr, flush=True)

    try:
        with SignalCancellation(farewell) as cancellation:
            return body(cancellation)
    except Cancelled as cancelled:
        # This handler is the worker process's entry point. Interpreter teardown with MONAI
        # loaded takes 0.5-2 s, too much of the 2 s a Cancel may take; nothing is left to
        # clean up (no file was written), so end here.
        farewell()
        sys.stdout.flush()
        os._exit(cancelled.exit_code)
    except UserError as error:
        if json_mode:
            emit_json({"error": str(error)})
        raise
    except Exception as error:
        from VCMSynthesisLib.cli import internal_error

        reported = internal_error(error)  # the traceback goes to a log that the line names
        if json_mode:
            emit_json({"error": str(reported)})
        raise reported from None


def run_sampling_command(args: argparse.Namespace,
                         run: Callable[[argparse.Namespace, SignalCancellation, bool], int]) -> int:
    """The entry of every sampling command: on `--server` the remote client, else `run(args,
    cancellation, json_mode)` as a worker command."""
    if args.server is not None:
        from VCMSynthesisLib.remote import run_remote_command

        return run_remote_command(args)
    json_mode = args.progress == "json"
    return run_worker_command(json_mode, lambda cancellation: run(args, cancellation, json_mode))


def modality_files(args: argparse.Namespace) -> dict[str, Path]:
    """`--modality NAME=FILE` arguments as {name: file}; a name given twice is an error."""
    modalities = dict(args.modality)
    if len(modalities) != len(args.modality):
        raise UserError("a modality was given twice; give each --modality NAME=FILE once")
    return modalities
