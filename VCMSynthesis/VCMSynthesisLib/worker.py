"""`vcm-synthesis synthesize` and `models`: the synthesis use case the Slicer panel's worker runs.

One run: check the output path, load the model, plan the decode to fit the memory available
(`memory.py`), assemble the conditions (`conditions.py`), sample (`sampler.py`), map the result
back onto the reference geometry and write it atomically with its provenance (`volumes.py`). The process
around it (cancellation, JSON lines, shared arguments) is `runtime.py`. torch and MONAI are
imported inside the functions, so that importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.label_maps import LabelMap, add_label_map_arguments, label_map_of
from VCMSynthesisLib.runtime import (
    JsonProgress,
    SignalCancellation,
    TextProgress,
    add_run_arguments,
    add_samples_arguments,
    add_server_arguments,
    check_run_outputs,
    emit_json,
    emit_result,
    emit_warning,
    modality_argument,
    modality_files,
    positive_int,
    process_age_s,
    resolve_device,
    run_sampling_command,
)

if TYPE_CHECKING:
    from VCMSynthesisLib.model_folder import LoadedModel

#: Steps between live previews: each costs one decoder forward (README: "Live preview").
DEFAULT_PREVIEW_EVERY = 5
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
        scheduler: the sampler, a key of `model_config.SAMPLING_SCHEDULERS` (None: the model's).
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
    scheduler: str | None = None
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
    from VCMSynthesisLib.memory import plan_decode
    from VCMSynthesisLib.sampler import SamplingStats, sample, sample_spread
    from VCMSynthesisLib.volumes import read_segmentation, read_volume, write_volumes_atomic

    cancellation = cancellation or SignalCancellation()
    timings: dict[str, float] = {}
    config = model.config
    if config.task == "superres":
        raise UserError(f"model '{config.name}' is a super-resolution model; run `vcm-synthesis superres "
                        f"--model {config.name} --input FILE --output FILE` instead")
    request.check_paths()
    model.decode_plan = plan_decode(config, model.folder, model.device, available=available_memory)

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
        image = sample(model, condition, steps=request.steps, scheduler=request.scheduler, seed=seed,
                       guided=request.guided, strength=request.strength, progress=sample_progress,
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
        made_with = provenance(model, request.seed, request.steps, request.scheduler,
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


def run_synthesize_command(args: argparse.Namespace) -> int:
    return run_sampling_command(args, _run_synthesize)


def synthesis_request(args: argparse.Namespace) -> SynthesisRequest:
    """The request of a parsed `synthesize` command line (the CLI and the server's jobs)."""
    modalities = modality_files(args)
    if args.segmentation is None and not modalities:
        raise UserError("no condition given; pass --segmentation FILE and/or --modality NAME=FILE")
    return SynthesisRequest(segmentation=args.segmentation, modalities=modalities, output=args.output,
                            steps=args.steps, scheduler=args.scheduler, seed=args.seed,
                            guided=not args.unguided, strength=args.strength, samples=args.samples,
                            uncertainty=args.uncertainty,
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
