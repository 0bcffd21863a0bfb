"""`vcm-synthesis synthesize` and `models`: the background process that Slicer starts.

One run: check the output path, load the model, assemble the conditions (`conditions.py`),
check the memory the job needs (`memory.py`), sample (`sampler.py`), map the result back onto
the reference geometry and write it atomically (`volumes.py`). With `--progress json`, stdout
carries one JSON object a line, flushed:

    {"step": k, "total": N, "elapsed_s": ..., "eta_s": ...}     after each denoising step
    {"warning": "<one line>"}                                     before the steps, if needed
    {"result": "<output path>", "timings": {...}}                 at the end
    {"error": "<one line>"}                                       on failure (plus the exit code)

SIGINT and SIGTERM stop the run within `SignalCancellation.GRACE_S` and leave no output;
exit codes are those of `errors.py`. torch and MONAI are imported inside the functions, so
that importing this module (the superres and batch commands reuse it) stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from VCMSynthesisLib.errors import EXIT_SIGINT, EXIT_SIGTERM, Cancelled, UsageError, UserError
from VCMSynthesisLib.label_maps import LabelMap, add_label_map_arguments, label_map_of

if TYPE_CHECKING:
    from VCMSynthesisLib.model_folder import LoadedModel

DEVICES = ("auto", "cpu", "cuda")
#: Steps between live previews: each costs one decoder forward (README: "Live preview").
DEFAULT_PREVIEW_EVERY = 5
MAX_SEED = 2**63 - 1
MAX_SAMPLES = 64  # every sample is held on the output grid until they are averaged
_MISSING = {"shipped": ", missing", "download": ", not downloaded", "user": ", missing"}


@dataclass
class SynthesisRequest:
    """One synthesis job: conditions in, one volume out.

    Args:
        segmentation: labelmap or `.seg.nrrd`; the output takes its geometry. None for models
            without a label table (the first modality is then the reference).
        modalities: modality name (as the model names it) -> volume file.
        output: the volume to write (.nrrd, .nii.gz, .nii, .mha).
        steps: denoising steps (None: the model's default).
        seed: random seed; the same seed gives the same image on the same device.
        guided: False samples the base model alone, ignoring the adapter.
        strength: condition strength (None: the model's default; `networks.modulate`).
        samples: draws averaged into the output (seeds `seed`, `seed + 1`, ...).
        uncertainty: where to write their per-voxel standard deviation (needs `samples` >= 2).
        preview: where to write the live preview (the predicted clean image every
            `preview_every` steps, on the output's grid); None: no preview.
        label_map: turns the segmentation's own label numbers into the model's labels.
    """

    segmentation: Path | None
    modalities: dict[str, Path]
    output: Path
    steps: int | None = None
    seed: int = 0
    guided: bool = True
    strength: float | None = None
    samples: int = 1
    uncertainty: Path | None = None
    preview: Path | None = None
    preview_every: int = DEFAULT_PREVIEW_EVERY
    label_map: LabelMap | None = None

    @property
    def reference_path(self) -> Path:
        return self.segmentation if self.segmentation is not None else next(iter(self.modalities.values()))

    def check_paths(self) -> None:
        """Before any work: the outputs can be written, are different files and none of the inputs."""
        inputs = {"--segmentation": self.segmentation,
                  **{f"--modality {name}": path for name, path in self.modalities.items()}}
        check_run_outputs(self.output, inputs, samples=self.samples, seed=self.seed,
                          uncertainty=self.uncertainty, preview=self.preview)


@dataclass
class SynthesisResult:
    output: Path
    timings: dict[str, float] = field(default_factory=dict)
    uncertainty: Path | None = None


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


def load_model(name_or_folder: str, device: str) -> LoadedModel:
    """A registry name or a model folder, loaded on `device` ("auto", "cpu" or "cuda")."""
    from VCMSynthesisLib.model_folder import load_model_folder
    from VCMSynthesisLib.registry import resolve_model

    return load_model_folder(resolve_model(name_or_folder), resolve_device(device))


def provenance(model: LoadedModel, seed: int, steps: int | None, scheduler: str | None,
               strength: float | None) -> dict[str, str]:
    """The key/value fields every synthesized, edited or super-resolved volume carries (NRRD
    header or JSON sidecar, `volumes.write_volumes_atomic`): how it was made. None takes the
    model's default, as the sampler does."""
    from VCMSynthesisLib import __version__

    config = model.config
    return {
        "vcm_model": config.name,
        "vcm_model_sha256": model.weights_sha256,
        "vcm_seed": str(seed),
        "vcm_steps": str(config.sampling_steps if steps is None else steps),
        "vcm_scheduler": scheduler or config.sampling_scheduler,
        "vcm_strength": repr(float(config.sampling_strength if strength is None else strength)),
        "vcm_version": __version__,
    }


def synthesize(
    model: LoadedModel,
    request: SynthesisRequest,
    *,
    progress: Callable[[int, int], None] | None = None,
    cancellation: SignalCancellation | None = None,
    available_memory: int | None = None,
    warn: Callable[[str], None] | None = None,
    on_preview: Callable[[Path, int], None] | None = None,
) -> SynthesisResult:
    """Run one request with a loaded model; the output appears complete or not at all.

    Args:
        model: from `load_model`.
        request: inputs, output and sampling settings.
        progress: called as `progress(step, total)` after each denoising step.
        cancellation: polled between steps; None runs to the end.
        available_memory: bytes the job may use (default: measured on the model's device).
        warn: called with a one-line warning (content beyond the model's field of view).
        on_preview: called as `on_preview(path, step)` after each preview is written.
    """
    import torch

    from VCMSynthesisLib.conditions import assemble_conditions
    from VCMSynthesisLib.memory import check_memory
    from VCMSynthesisLib.sampler import SamplingStats, sample, sample_spread
    from VCMSynthesisLib.volumes import read_segmentation, read_volume, write_volumes_atomic

    cancellation = cancellation or SignalCancellation()
    timings: dict[str, float] = {}
    config = model.config
    if config.task == "superres":
        raise UserError(f"model '{config.name}' is a super-resolution model; run `vcm-synthesis superres "
                        f"--model {config.name} --input FILE --output FILE` instead")
    request.check_paths()
    check_memory(config, model.folder, model.device, available=available_memory)

    start = time.perf_counter()
    segmentation = read_segmentation(request.segmentation) if request.segmentation is not None else None
    volumes = {name: read_volume(path) for name, path in request.modalities.items()}
    conditions = assemble_conditions(config, segmentation, volumes,
                                     {name: str(path) for name, path in request.modalities.items()},
                                     request.label_map)
    condition = torch.from_numpy(conditions.channels).unsqueeze(0)
    timings["conditions_s"] = time.perf_counter() - start
    if conditions.cropped and warn is not None:
        extent = " x ".join(f"{n * s:g}" for n, s in zip(config.grid.size, config.grid.spacing))
        warn(f"the conditions' content extends beyond model '{config.name}''s field of view ({extent} mm); "
             "outside it the output is background")

    stats = SamplingStats()
    preview = None
    if request.preview is not None:
        preview = PreviewWriter(model, conditions, request.preview, request.preview_every,
                                request.reference_path, cancellation, on_preview)
    start = time.perf_counter()

    def draw(seed: int, sample_progress):
        image = sample(model, condition, steps=request.steps, seed=seed, guided=request.guided,
                       strength=request.strength, progress=sample_progress,
                       should_cancel=cancellation.should_cancel, stats=stats, preview=preview)
        return image[0, 0].numpy()

    mean, std = sample_spread(draw, samples=request.samples, steps=request.steps or config.sampling_steps,
                              seed=request.seed, progress=progress)
    timings["sampling_s"] = time.perf_counter() - start
    timings.update(model_s=stats.model_s, base_s=stats.base_s, adapter_s=stats.adapter_s,
                   decoder_s=stats.decoder_s)
    if preview is not None:
        timings["preview_s"] = preview.seconds
    start = time.perf_counter()
    result = conditions.synthesized_to_reference(mean, config)
    with cancellation.deferred():
        # The uncertainty first: the main output appears only once everything is written.
        volumes = [(result, request.output, request.reference_path)]
        if request.uncertainty is not None:
            volumes.insert(0, (conditions.to_reference(std, default_value=0.0), request.uncertainty,
                               request.reference_path))
        made_with = provenance(model, request.seed, request.steps, None,
                               request.strength if request.guided else 0.0)
        output = write_volumes_atomic(volumes, cancellation.commit, made_with)[-1]
    timings["write_s"] = time.perf_counter() - start
    return SynthesisResult(output=output, timings=timings, uncertainty=request.uncertainty)


class PreviewWriter:
    """`sample`'s preview callback: every `every` steps but the last (the result follows), the
    predicted clean image on the output's grid, written atomically to `path`, then announced.

    Each preview costs one decoder forward and a write; `seconds` adds them up.
    """

    def __init__(self, model: LoadedModel, conditions, path: Path, every: int, reference: Path,
                 cancellation: SignalCancellation, announce: Callable[[Path, int], None] | None = None):
        self.model, self.conditions, self.path, self.every = model, conditions, Path(path), every
        self.reference, self.cancellation, self.announce = reference, cancellation, announce
        self.seconds = 0.0

    def __call__(self, step: int, total: int, predicted_clean) -> None:
        from VCMSynthesisLib.sampler import decode_latent
        from VCMSynthesisLib.volumes import write_volume_atomic

        if step % self.every or step == total:
            return
        start = time.perf_counter()
        image = decode_latent(self.model, predicted_clean)
        on_reference = self.conditions.synthesized_to_reference(image, self.model.config)
        with self.cancellation.deferred():
            write_volume_atomic(on_reference, self.path, reference=self.reference)
        self.seconds += time.perf_counter() - start
        if self.announce is not None:
            self.announce(self.path, step)


# --- command line ---------------------------------------------------------------------------


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


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`--steps --seed --strength --device --progress`, as every sampling command takes them."""
    parser.add_argument("--steps", type=positive_int,
                        help="denoising steps per sample (default: the model's)")
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


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synthesize", help="synthesize a volume from a segmentation and/or modalities",
        description="Synthesize one volume with a VCM model; the output has the geometry of the "
                    "segmentation (or of the first modality).")
    parser.add_argument("--model", required=True, help="model name (see `vcm-synthesis models`) or folder")
    parser.add_argument("--segmentation", type=Path, help="labelmap (.nrrd, .nii.gz) or Slicer .seg.nrrd")
    add_label_map_arguments(parser)
    parser.add_argument("--modality", type=modality_argument, action="append", default=[],
                        metavar="NAME=FILE",
                        help="a modality condition, e.g. T2=t2.nrrd (repeatable)")
    parser.add_argument("--output", type=Path, required=True, help="volume to write (.nrrd, .nii.gz, .mha)")
    add_run_arguments(parser)
    parser.add_argument("--unguided", action="store_true",
                        help="sample the base model alone, without the adapter (for comparison)")
    add_samples_arguments(parser, default=1)
    parser.add_argument("--preview", type=Path, help="live preview: write the predicted clean image here "
                                                     "every --preview-every steps (JSON line {\"preview\"})")
    parser.add_argument("--preview-every", type=positive_int, default=DEFAULT_PREVIEW_EVERY,
                        help=f"steps between previews (default {DEFAULT_PREVIEW_EVERY})")
    add_server_arguments(parser)
    parser.set_defaults(handler=run_synthesize_command)

    models = subparsers.add_parser("models", help="list the models this installation can use",
                                   description="List shipped and downloaded models.")
    models.add_argument("--json", action="store_true", help="one JSON object per model")
    models.set_defaults(handler=run_models_command)


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
        elapsed = time.perf_counter() - self.start
        self.emit({"step": step, "total": total, "elapsed_s": round(elapsed, 3),
                   "eta_s": round(elapsed / step * (total - step), 3)})


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


def run_synthesize_command(args: argparse.Namespace) -> int:
    return run_sampling_command(args, _run_synthesize)


def modality_files(args: argparse.Namespace) -> dict[str, Path]:
    """`--modality NAME=FILE` arguments as {name: file}; a name given twice is an error."""
    modalities = dict(args.modality)
    if len(modalities) != len(args.modality):
        raise UserError("a modality was given twice; give each --modality NAME=FILE once")
    return modalities


def synthesis_request(args: argparse.Namespace) -> SynthesisRequest:
    """The request of a parsed `synthesize` command line (the CLI and the server's jobs)."""
    modalities = modality_files(args)
    if args.segmentation is None and not modalities:
        raise UserError("no condition given; pass --segmentation FILE and/or --modality NAME=FILE")
    return SynthesisRequest(segmentation=args.segmentation, modalities=modalities, output=args.output,
                            steps=args.steps, seed=args.seed, guided=not args.unguided,
                            strength=args.strength, samples=args.samples, uncertainty=args.uncertainty,
                            preview=args.preview, preview_every=args.preview_every,
                            label_map=label_map_of(args))


def _run_synthesize(args: argparse.Namespace, cancellation: SignalCancellation, json_mode: bool) -> int:
    started = process_age_s()
    request = synthesis_request(args)
    request.check_paths()
    start = time.perf_counter()
    model = load_model(args.model, args.device)
    load_s = time.perf_counter() - start
    # Everything imported so far lives until exit: keep the garbage collector off it, which
    # also cuts interpreter teardown (MONAI's many modules) from ~1.7 s to ~0.4 s.
    gc.freeze()
    progress = JsonProgress() if json_mode else TextProgress()
    announce = (lambda path, step: emit_json({"preview": str(path), "step": step})) if json_mode else None
    result = synthesize(model, request, progress=progress, cancellation=cancellation,
                        warn=partial(emit_warning, json_mode), on_preview=announce)
    timings = {"startup_s": started, "load_s": load_s, **result.timings, "total_s": process_age_s()}
    emit_result(json_mode, result.output, timings, uncertainty=result.uncertainty,
                describe=lambda t: f"{t.get('sampling_s', 0):.1f} s sampling, "
                                   f"{t.get('total_s', 0):.1f} s in all")
    return 0


def run_models_command(args: argparse.Namespace) -> int:
    from VCMSynthesisLib.registry import list_models

    entries = list_models()
    if args.json:
        for entry in entries:
            emit_json({"name": entry.name, "task": entry.task, "description": entry.description,
                       "conditions": entry.conditions, "source": entry.source, "folder": str(entry.folder),
                       "available": entry.available})
        return 0
    header = ("name", "task", "conditions", "where")
    rows = [header] + [
        (entry.name, entry.task, entry.conditions,
         f"{entry.folder} ({entry.source}{'' if entry.available else _MISSING[entry.source]})")
        for entry in entries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
