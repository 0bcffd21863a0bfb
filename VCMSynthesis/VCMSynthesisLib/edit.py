"""`vcm-synthesis edit`: re-synthesize the edited part of a scan and keep the rest of it exactly.

The user changes a scan's segmentation (grows a ventricle, paints a lesion). The edit region is
where the edited segmentation differs from the original (or a mask given outright), grown by a
margin. The scan is encoded into the model's latent on the model grid that `synthesize` would
use for the edited segmentation; the VCM-guided sampler inpaints the latent over the grown region
(`sampler.KnownLatent`), keeping the scan's latent elsewhere; the decoded result is mapped back to
the scan's units and grid and blended into the scan with a weight that is 1 on the region and
falls smoothly to 0 across the margin. Beyond the margin the output is the scan, value for value,
with the scan's geometry header.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from VCMSynthesisLib.errors import UsageError, UserError
from VCMSynthesisLib.label_maps import LabelMap, add_label_map_arguments, label_map_of

if TYPE_CHECKING:  # torch and the networks load only when a run starts (fast --help)
    from VCMSynthesisLib.conditions import IntensityScaling
    from VCMSynthesisLib.model_config import ModelConfig
    from VCMSynthesisLib.model_folder import LoadedModel
    from VCMSynthesisLib.sampler import SamplingStats
    from VCMSynthesisLib.volumes import Segmentation

#: The blend zone around the edited voxels: one latent voxel of the demo models (4 x 2 mm).
DEFAULT_MARGIN_MM = 8.0
#: The scan's percentiles mapped onto the ends of the model's intensity range, as the
#: percentile-normalized modalities of the model configs do.
SCAN_PERCENTILES = (1.0, 99.0)
#: Relative (and, in mm, absolute) difference up to which geometries count as the same grid.
GRID_TOLERANCE = 1e-5
#: RePaint resampling rounds per step by default (1 = plain blended latent diffusion).
DEFAULT_RESAMPLE = 1


@dataclass
class EditInputs:
    """The files of one edit, read and checked against each other.

    Args:
        scan: the scan to edit, as read (its pixel type and geometry are the output's).
        segmentation: the edited segmentation, on the scan's grid.
        original: the segmentation before the edit (None when `region` is given).
        region: the explicit edit mask, non-zero voxels (None when `original` is given).
        modalities: modality conditions the model takes, name -> volume.
    """

    scan: sitk.Image
    segmentation: Segmentation
    original: Segmentation | None = None
    region: sitk.Image | None = None
    modalities: dict[str, sitk.Image] = field(default_factory=dict)
    label_map: LabelMap | None = None


@dataclass
class EditResult:
    """The edited scan, its per-voxel spread across samples and the blend weight, on the scan's grid."""

    image: sitk.Image
    std: sitk.Image
    weight: np.ndarray  # SimpleITK order [k, j, i], 1 on the region, 0 beyond the margin


def check_on_scan_grid(image: sitk.Image, scan: sitk.Image, what: str) -> None:
    """Refuse a volume that is not on the scan's voxel grid: same size, same spacing, origin and
    direction to float32 precision (NIfTI headers store them in float32), so voxel for voxel."""
    for name, mine, theirs in (("size", image.GetSize(), scan.GetSize()),
                               ("spacing", image.GetSpacing(), scan.GetSpacing()),
                               ("origin", image.GetOrigin(), scan.GetOrigin()),
                               ("direction", image.GetDirection(), scan.GetDirection())):
        if not np.allclose(mine, theirs, rtol=GRID_TOLERANCE, atol=GRID_TOLERANCE):
            def show(values):
                return " x ".join(f"{value:.6g}" for value in values)
            raise UserError(f"{what} is not on the scan's voxel grid ({name} {show(mine)}, the scan's "
                            f"{show(theirs)}); export it with the scan as the reference geometry")


def read_edit_inputs(scan: Path, segmentation: Path, *, original: Path | None = None,
                     region: Path | None = None, modalities: dict[str, Path] | None = None,
                     label_map: LabelMap | None = None) -> EditInputs:
    """Read the scan, the edited segmentation and the original segmentation or region mask
    (both segmentations in the numbers `label_map` turns into the model's labels, if given)."""
    from VCMSynthesisLib.volumes import read_segmentation, read_volume

    if (original is None) == (region is None):
        raise UsageError("give the segmentation before the edit (--original-segmentation) or the "
                         "region to re-synthesize (--region), one of the two")
    scan_image = read_volume(scan)
    edited = read_segmentation(segmentation)
    check_on_scan_grid(edited.labelmap, scan_image, f"segmentation '{segmentation}'")
    inputs = EditInputs(scan=scan_image, segmentation=edited,
                        modalities={name: read_volume(path) for name, path in (modalities or {}).items()},
                        label_map=label_map)
    if original is not None:
        inputs.original = read_segmentation(original)
        check_on_scan_grid(inputs.original.labelmap, scan_image, f"original segmentation '{original}'")
    else:
        inputs.region = read_volume(region)
        check_on_scan_grid(inputs.region, scan_image, f"region '{region}'")
    return inputs


def edit_region(config: ModelConfig, inputs: EditInputs) -> np.ndarray:
    """The voxels to re-synthesize (SimpleITK order): the region mask, or where the labels changed.

    Labels are compared as the model reads them (segments matched to its label table), so two
    `.seg.nrrd` files that number the same segments differently do not differ.
    """
    from VCMSynthesisLib.conditions import label_values_to_table

    if inputs.region is not None:
        region = sitk.GetArrayFromImage(inputs.region) != 0
        if not region.any():
            raise UserError("the region mask is empty (every voxel is 0); mark the voxels to "
                            "re-synthesize with non-zero values")
        return region
    edited = label_values_to_table(inputs.segmentation, config.labels, config.name, inputs.label_map)
    original = label_values_to_table(inputs.original, config.labels, config.name, inputs.label_map)
    region = edited != original
    if not region.any():
        raise UserError("the edited segmentation equals the original one, so there is nothing to "
                        "re-synthesize; edit the segmentation first")
    return region


def distance_mm(mask: np.ndarray, spacing_xyz) -> np.ndarray:
    """Distance in mm from each voxel to the nearest voxel of `mask` (0 on it), SimpleITK order."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask, sampling=tuple(spacing_xyz)[::-1])


def falloff(distance: np.ndarray, margin_mm: float) -> np.ndarray:
    """1 at distance 0, a raised cosine down to 0 at `margin_mm`, 0 beyond (no kink at either end)."""
    if margin_mm <= 0:
        return (distance <= 0).astype(np.float64)
    ramp = np.clip(distance / margin_mm, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * ramp))


def blend_weight(region: np.ndarray, in_view: np.ndarray, spacing_xyz, margin_mm: float) -> np.ndarray:
    """Weight of the re-synthesized image: 1 on the region, falling to 0 across the margin.

    It also falls to 0 across the margin inside the model's field of view (`in_view`), so an edit
    near the field's edge meets the scan smoothly there too.
    """
    weight = falloff(distance_mm(region, spacing_xyz), margin_mm)
    if not in_view.all():
        weight *= 1.0 - falloff(distance_mm(~in_view, spacing_xyz), margin_mm)
    return weight


def scan_scaling(scan: np.ndarray, config: ModelConfig, what: str) -> IntensityScaling:
    """The map from the scan's units to the model's: its `SCAN_PERCENTILES` onto the model's range.

    An `IntensityScaling` whose `normalize` gives model units and `restore` scan units.
    """
    from VCMSynthesisLib.conditions import IntensityScaling

    percentiles = IntensityScaling.from_percentiles(scan, *SCAN_PERCENTILES, what)
    low, high = config.intensity_range
    width = (percentiles.high - percentiles.low) / (high - low)
    start = percentiles.low - low * width
    return IntensityScaling(start, start + width)


def edit_scan(
    model: LoadedModel,
    inputs: EditInputs,
    *,
    margin_mm: float = DEFAULT_MARGIN_MM,
    samples: int = 1,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    strength: float | None = None,
    resample: int = DEFAULT_RESAMPLE,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    stats: SamplingStats | None = None,
    warn: Callable[[str], None] | None = None,
) -> EditResult:
    """Re-synthesize the edit region of `inputs.scan` following `inputs.segmentation`.

    Args:
        model: a loaded synthesis model with a label table.
        inputs: from `read_edit_inputs`.
        margin_mm: width of the blend zone around the region; beyond it the scan is kept.
        samples: edits to average (seeds `seed`, `seed + 1`, ...); the spread is their std.
        steps: denoising steps (default: the model's).
        scheduler: the sampler, a key of `model_config.SAMPLING_SCHEDULERS` (default: the model's).
        seed: seed of the first sample.
        strength: condition strength (default: the model's; `networks.modulate`).
        resample: RePaint resampling rounds per step.
        progress: `progress(step, total)` over all samples' steps.
        should_cancel: checked between steps; True raises `errors.Cancelled`.
        stats: accumulates the seconds spent in network forwards.
        warn: called with a one-line warning (part of the region outside the field of view).

    Returns:
        the edited scan (the scan's pixel type and geometry), the spread of the output across
        samples (float32, 0 beyond the margin) and the blend weight.
    """
    import torch

    from VCMSynthesisLib import conditions
    from VCMSynthesisLib.sampler import KnownLatent, sample, sample_spread

    config = model.config
    if not config.labels:
        raise UserError(f"model '{config.name}' takes no segmentation, so it cannot follow an edited one; "
                        "pick a synthesis model with labels (e.g. demo)")
    if not (math.isfinite(margin_mm) and margin_mm >= 0):
        raise UsageError(f"--margin-mm must be a number of millimetres, 0 or more, got {margin_mm:g}")
    region = edit_region(config, inputs)
    built = conditions.assemble_conditions(config, inputs.segmentation, inputs.modalities,
                                           label_map=inputs.label_map)
    scan = inputs.scan
    spacing = scan.GetSpacing()
    ones = conditions.image_from_array(np.ones(built.grid.GetSize(), np.float32), built.grid)
    # Voxels whose interpolation from the model grid stays wholly inside it.
    in_view = sitk.GetArrayFromImage(conditions.resample_to_grid(ones, scan, labels=False)) > 1.0 - 1e-6
    if not (region & in_view).any():
        extent = " x ".join(f"{n * s:g}" for n, s in zip(config.grid.size, config.grid.spacing))
        raise UserError(f"the edit region lies outside model '{config.name}''s field of view ({extent} mm "
                        "around the segmentation's centre); edit inside it")
    if not (region <= in_view).all() and warn is not None:
        warn(f"part of the edit region lies outside model '{config.name}''s field of view; "
             "it is kept as in the scan")
    weight = blend_weight(region, in_view, spacing, margin_mm)

    scan_values = sitk.GetArrayFromImage(scan)
    scaling = scan_scaling(scan_values, config, "the scan")
    background = float(scaling.restore(np.float32(config.intensity_range[0])))  # outside the scan
    on_grid = conditions.array_from_image(conditions.resample_to_grid(
        sitk.Cast(scan, sitk.sitkFloat32), built.grid, labels=False, default_value=background))
    weight_image = sitk.GetImageFromArray(weight.astype(np.float32))
    weight_image.CopyInformation(scan)
    # The latent is redrawn wherever the blend reaches: every latent voxel under a weight > 0.
    generate = conditions.array_from_image(
        conditions.resample_to_grid(weight_image, built.grid, labels=False)) > 0
    latent_size = config.latent_shape[1:]
    factor = [g // n for g, n in zip(config.grid.size, latent_size)]
    with torch.inference_mode():
        image = torch.from_numpy(scaling.normalize(on_grid))[None, None].to(model.device)
        known = model.encode(image)
        mask = torch.nn.functional.max_pool3d(torch.from_numpy(generate)[None, None].float(), factor, factor)
    known = KnownLatent(latent=known.float().cpu(), mask=mask, resample=resample)
    condition = torch.from_numpy(built.channels).unsqueeze(0)

    def draw(sample_seed: int, sample_progress) -> np.ndarray:
        drawn = sample(model, condition, steps=steps, scheduler=scheduler, seed=sample_seed,
                       strength=strength, progress=sample_progress, should_cancel=should_cancel, stats=stats,
                       known=known)[0, 0].numpy()
        restored = built.to_reference(scaling.restore(drawn), default_value=0.0)
        return sitk.GetArrayFromImage(restored)

    drawn_mean, drawn_std = sample_spread(draw, samples=samples, steps=steps or config.sampling_steps,
                                          seed=seed, progress=progress)
    blended = weight * drawn_mean + (1.0 - weight) * scan_values
    edited = np.where(weight > 0, _in_pixel_type(blended, scan_values.dtype), scan_values)
    result = sitk.GetImageFromArray(edited)
    result.CopyInformation(scan)
    spread = sitk.GetImageFromArray((weight * drawn_std).astype(np.float32))
    spread.CopyInformation(scan)
    return EditResult(image=result, std=spread, weight=weight)


def _in_pixel_type(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` in the scan's pixel type (rounded and clipped to its range for integer types)."""
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        return np.clip(np.rint(values), limits.min, limits.max).astype(dtype)
    return values.astype(dtype)


@dataclass
class EditRequest:
    """One edit job: files in, one volume (and optionally its spread) out; see `edit_scan`."""

    image: Path
    segmentation: Path
    output: Path
    original_segmentation: Path | None = None
    region: Path | None = None
    modalities: dict[str, Path] = field(default_factory=dict)
    margin_mm: float = DEFAULT_MARGIN_MM
    resample: int = DEFAULT_RESAMPLE
    samples: int = 1
    uncertainty: Path | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int = 0
    strength: float | None = None
    label_map: LabelMap | None = None


@dataclass
class EditOutcome:
    output: Path
    uncertainty: Path | None
    edited_voxels: int  # voxels with a blend weight above 0
    timings: dict[str, float] = field(default_factory=dict)


def check_edit_request(request: EditRequest) -> None:
    """What can be refused before anything is read: an output naming an input, a bad uncertainty
    request, an output that cannot be written."""
    from VCMSynthesisLib.runtime import check_run_outputs

    check_run_outputs(
        request.output,
        {"--image": request.image, "--segmentation": request.segmentation,
         "--original-segmentation": request.original_segmentation, "--region": request.region,
         **{f"--modality {name}": path for name, path in request.modalities.items()}},
        samples=request.samples, seed=request.seed, uncertainty=request.uncertainty)


def run_edit(model: LoadedModel, request: EditRequest, *, progress: Callable[[int, int], None] | None = None,
             cancellation=None, warn: Callable[[str], None] | None = None) -> EditOutcome:
    """Run one edit with a loaded model; the outputs appear complete or not at all.

    Args:
        model: from `worker.load_model`.
        request: inputs, output and settings.
        progress: `progress(step, total)` after each denoising step.
        cancellation: a `runtime.SignalCancellation`, polled between steps; None runs to the end.
        warn: called with one-line warnings.
    """
    from VCMSynthesisLib.memory import plan_decode
    from VCMSynthesisLib.runtime import SignalCancellation
    from VCMSynthesisLib.sampler import SamplingStats
    from VCMSynthesisLib.volumes import write_volumes_atomic
    from VCMSynthesisLib.worker import provenance

    cancellation = cancellation or SignalCancellation()
    check_edit_request(request)
    model.decode_plan = plan_decode(model.config, model.folder, model.device, encodes=True)
    start = time.perf_counter()
    inputs = read_edit_inputs(request.image, request.segmentation, original=request.original_segmentation,
                              region=request.region, modalities=request.modalities,
                              label_map=request.label_map)
    timings = {"read_s": time.perf_counter() - start}
    stats = SamplingStats()
    start = time.perf_counter()
    result = edit_scan(model, inputs, margin_mm=request.margin_mm, samples=request.samples,
                       steps=request.steps, scheduler=request.scheduler, seed=request.seed,
                       strength=request.strength, resample=request.resample, progress=progress,
                       should_cancel=cancellation.should_cancel, stats=stats, warn=warn)
    timings.update(edit_s=time.perf_counter() - start, model_s=stats.model_s)
    start = time.perf_counter()
    with cancellation.deferred():
        # The uncertainty first: the main output appears only once everything is written.
        volumes = [(result.image, request.output, request.image)]
        if request.uncertainty is not None:
            volumes.insert(0, (result.std, request.uncertainty, request.image))
        made_with = provenance(model, request.seed, request.steps, request.scheduler, request.strength)
        output = write_volumes_atomic(volumes, cancellation.commit, made_with)[-1]
    timings["write_s"] = time.perf_counter() - start
    return EditOutcome(output=output, uncertainty=request.uncertainty,
                       edited_voxels=int((result.weight > 0).sum()), timings=timings)


# --- command line ---------------------------------------------------------------------------


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of millimetres, got '{text}'") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of millimetres, 0 or more, got '{text}'")
    return value


def register(subparsers) -> None:
    from VCMSynthesisLib.runtime import (
        add_run_arguments,
        add_samples_arguments,
        add_server_arguments,
        modality_argument,
        positive_int,
    )

    parser = subparsers.add_parser(
        "edit", help="re-synthesize the edited region of a scan, keep the rest",
        description="Edit a scan through its segmentation: the region where the edited segmentation "
                    "differs from the original (or --region) is re-synthesized to follow it, blended in "
                    "across --margin-mm; beyond that the output is the scan exactly.")
    parser.add_argument("--model", required=True, help="synthesis model name or folder (with labels)")
    parser.add_argument("--image", type=Path, required=True, help="the scan to edit (.nrrd, .nii.gz, .mha)")
    parser.add_argument("--segmentation", type=Path, required=True,
                        help="the edited segmentation, on the scan's grid (labelmap or .seg.nrrd)")
    add_label_map_arguments(parser)
    region = parser.add_mutually_exclusive_group(required=True)
    region.add_argument("--original-segmentation", type=Path,
                        help="the segmentation before the edit: the region is where the two differ")
    region.add_argument("--region", type=Path, help="mask of the voxels to re-synthesize (non-zero)")
    parser.add_argument("--modality", type=modality_argument, action="append", default=[],
                        metavar="NAME=FILE", help="a modality condition the model takes (repeatable)")
    parser.add_argument("--output", type=Path, required=True, help="volume to write (.nrrd, .nii.gz, .mha)")
    parser.add_argument("--margin-mm", type=_margin, default=DEFAULT_MARGIN_MM,
                        help=f"blend zone around the region in mm (default {DEFAULT_MARGIN_MM:g})")
    parser.add_argument("--resample", type=positive_int, default=DEFAULT_RESAMPLE,
                        help="RePaint resampling rounds per step: more agreement with the kept scan, "
                             f"proportionally slower (default {DEFAULT_RESAMPLE})")
    add_samples_arguments(parser, default=1)
    add_run_arguments(parser)
    add_server_arguments(parser)
    parser.set_defaults(handler=run_edit_command)


def run_edit_command(args: argparse.Namespace) -> int:
    from VCMSynthesisLib.runtime import run_sampling_command

    return run_sampling_command(args, _run_edit)


def edit_request(args: argparse.Namespace) -> EditRequest:
    """The request of a parsed `edit` command line (the CLI and the server's jobs)."""
    from VCMSynthesisLib.runtime import modality_files

    modalities = modality_files(args)
    return EditRequest(image=args.image, segmentation=args.segmentation, output=args.output,
                       original_segmentation=args.original_segmentation, region=args.region,
                       modalities=modalities, margin_mm=args.margin_mm, resample=args.resample,
                       samples=args.samples, uncertainty=args.uncertainty, steps=args.steps,
                       scheduler=args.scheduler, seed=args.seed, strength=args.strength,
                       label_map=label_map_of(args))


def _run_edit(args: argparse.Namespace, cancellation, json_mode: bool) -> int:
    from functools import partial

    from VCMSynthesisLib.runtime import JsonProgress, TextProgress, emit_result, emit_warning, process_age_s
    from VCMSynthesisLib.worker import load_model

    started = process_age_s()
    request = edit_request(args)
    check_edit_request(request)  # before the model loads: a wrong path fails at once
    start = time.perf_counter()
    model = load_model(args.model, args.device)
    load_s = time.perf_counter() - start
    gc.freeze()  # as `synthesize` does: the loaded modules live until exit
    result = run_edit(model, request, progress=JsonProgress() if json_mode else TextProgress(),
                      cancellation=cancellation, warn=partial(emit_warning, json_mode))
    timings = {"startup_s": started, "load_s": load_s, **result.timings, "total_s": process_age_s()}
    emit_result(json_mode, result.output, timings, uncertainty=result.uncertainty,
                edited_voxels=result.edited_voxels,
                describe=lambda t: f"{result.edited_voxels} voxels re-synthesized or blended; "
                                   f"{t.get('edit_s', 0):.1f} s editing, {t.get('total_s', 0):.1f} s in all")
    return 0
