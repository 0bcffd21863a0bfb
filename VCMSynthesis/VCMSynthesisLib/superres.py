"""Axial super-resolution: a thick-slice scan in, an isotropic volume out, in the input's units.

The thick-slice scan is the VCM condition; the frozen diffusion model supplies the anatomy
between the slices. Around the sampler this module adds the geometry of the problem: which
image axis holds the thick slices (the one with the largest spacing, whatever the direction
matrix), the isotropic output grid covering the input's physical footprint with the input's
directions, the slab-average forward model of a thick-slice acquisition, and a data-consistency
step that makes the result reproduce the acquired slabs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from VCMSynthesisLib.errors import UserError

if TYPE_CHECKING:  # torch and the networks load only when a run starts (fast --help)
    from VCMSynthesisLib.model_config import ModelConfig
    from VCMSynthesisLib.model_folder import LoadedModel
    from VCMSynthesisLib.sampler import SamplingStats

DEFAULT_MODEL = "demo-superres"

#: Below this slice-to-in-plane spacing ratio a volume is not a thick-slice scan.
MIN_THICKNESS_RATIO = 1.2
#: Slabs this many times thicker than the thickest the model was trained on are refused.
ABSURD_THICKNESS_FACTOR = 3.0
#: Back-projection iterations (under a second in all for a 2 mm brain); with the floor on dark
#: voxels the estimate keeps improving up to about 20.
CONSISTENCY_ITERATIONS = 20
#: Samples averaged by default: at 5 mm the mean of 4 (the posterior mean's estimate) beats one
#: draw by 0.6 dB PSNR, and B-spline by 3.0 dB (demo-superres, DDPM; training/README.md).
DEFAULT_SAMPLES = 4


@dataclass(frozen=True)
class SliceGeometry:
    """How a thick-slice volume was acquired, read from its spacing.

    Args:
        axis: image (index) axis along which the slices are stacked, 0, 1 or 2.
        thickness_mm: spacing along that axis; slabs are taken as contiguous (thickness = spacing).
        in_plane_mm: the finest spacing of the two in-plane axes.
    """

    axis: int
    thickness_mm: float
    in_plane_mm: float

    @property
    def ratio(self) -> float:
        return self.thickness_mm / self.in_plane_mm


def slice_geometry(image: sitk.Image) -> SliceGeometry:
    """The slice axis is the image axis with the largest spacing, in any orientation.

    Raises UserError when no axis is clearly thicker than the others: such a volume has
    nothing to super-resolve.
    """
    if image.GetDimension() != 3:
        raise UserError(f"super-resolution needs a 3D volume, got a {image.GetDimension()}D image")
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    axis = int(np.argmax(spacing))
    in_plane = float(np.min(np.delete(spacing, axis)))
    geometry = SliceGeometry(axis=axis, thickness_mm=float(spacing[axis]), in_plane_mm=in_plane)
    if geometry.ratio < MIN_THICKNESS_RATIO:
        spacing_text = " x ".join(f"{value:g}" for value in spacing)
        raise UserError(
            f"the input is not a thick-slice volume (spacing {spacing_text} mm): super-resolution "
            f"needs one axis at least {MIN_THICKNESS_RATIO:g} times coarser than the others"
        )
    return geometry


def check_thickness(geometry: SliceGeometry, trained_range_mm: tuple[float, float]) -> str | None:
    """Compare the slab thickness with the range the model was trained on.

    Returns a warning (one line) when the thickness is outside that range, None when inside;
    raises UserError when it is absurd (more than `ABSURD_THICKNESS_FACTOR` times the thickest).
    """
    low, high = trained_range_mm
    thickness = geometry.thickness_mm
    if thickness > ABSURD_THICKNESS_FACTOR * high:
        raise UserError(
            f"slices {thickness:g} mm thick are far beyond what this model was trained on "
            f"({low:g}-{high:g} mm); use a model trained for such slabs"
        )
    if thickness < low or thickness > high:
        return (
            f"slices are {thickness:g} mm thick but the model was trained on {low:g}-{high:g} mm slabs; "
            "expect a less faithful result"
        )
    return None


def footprint_corners(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical positions of the outer corners of the first and last voxels (index -0.5, n-0.5)."""
    size = np.asarray(image.GetSize(), dtype=float)
    first = image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
    last = image.TransformContinuousIndexToPhysicalPoint((size - 0.5).tolist())
    return np.asarray(first), np.asarray(last)


def isotropic_grid(image: sitk.Image, spacing_mm: float | None = None) -> sitk.Image:
    """An empty float32 image: the input's footprint on an isotropic grid with its directions.

    The number of voxels per axis is the footprint length over the new spacing, rounded; the
    grid is centred on the input's footprint, so each face moves by at most a quarter voxel.

    Args:
        image: the thick-slice volume.
        spacing_mm: output spacing; default the input's finest in-plane spacing.
    """
    if spacing_mm is None:
        spacing_mm = slice_geometry(image).in_plane_mm
    if not math.isfinite(spacing_mm) or spacing_mm <= 0:
        raise UserError(f"--spacing must be a positive number of millimetres, got {spacing_mm:g}")
    extent = np.asarray(image.GetSize(), dtype=float) * np.asarray(image.GetSpacing(), dtype=float)
    with np.errstate(over="ignore"):  # a tiny spacing gives inf here, refused just below
        counts = np.maximum(1.0, np.round(extent / spacing_mm))
        voxels = float(np.prod(counts))
    if voxels > 1024**3:
        shape = " x ".join(f"{n:.0f}" for n in counts)
        raise UserError(f"an output grid of {shape} voxels at {spacing_mm:g} mm is too large; "
                        "pass a coarser --spacing")
    size = counts.astype(int)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    centre = np.asarray(
        image.TransformContinuousIndexToPhysicalPoint(((np.asarray(image.GetSize()) - 1) / 2.0).tolist())
    )
    origin = centre - direction @ ((size - 1) / 2.0 * spacing_mm)
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def _subsample_count(fine: sitk.Image, thick: sitk.Image, axis: int) -> int:
    """Samples per slab: at least 4, and at least two per fine voxel across the slab."""
    finest = min(fine.GetSpacing())
    return max(4, math.ceil(2.0 * thick.GetSpacing()[axis] / finest))


def slab_average(fine: sitk.Image, thick: sitk.Image, axis: int) -> sitk.Image:
    """Forward model of a thick-slice acquisition: average `fine` over each slab of `thick`.

    Each voxel of `thick` is a slab: its in-plane position is point-sampled and the slice axis
    is integrated over the voxel's full thickness (linear interpolation of `fine` at evenly
    spaced points, nearest-neighbour outside `fine`). Works for any direction matrix.

    Args:
        fine: the volume to average (any grid overlapping `thick`).
        thick: the thick-slice geometry (its pixel values are ignored).
        axis: the slice axis of `thick`.

    Returns:
        a float32 image on `thick`'s grid.
    """
    count = _subsample_count(fine, thick, axis)
    size = list(thick.GetSize())
    spacing = list(thick.GetSpacing())
    offset = np.zeros(3)
    offset[axis] = -0.5 + 0.5 / count
    origin = thick.TransformContinuousIndexToPhysicalPoint(offset.tolist())
    size[axis] *= count
    spacing[axis] /= count
    sampled = sitk.Resample(
        sitk.Cast(fine, sitk.sitkFloat32),
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        spacing,
        thick.GetDirection(),
        0.0,
        sitk.sitkFloat32,
        True,
    )
    array = sitk.GetArrayViewFromImage(sampled)
    numpy_axis = 2 - axis
    shape = list(array.shape)
    shape[numpy_axis : numpy_axis + 1] = [thick.GetSize()[axis], count]
    averaged = array.reshape(shape).mean(axis=numpy_axis + 1, dtype=np.float64).astype(np.float32)
    result = sitk.GetImageFromArray(averaged)
    result.CopyInformation(thick)
    return result


def enforce_consistency(
    estimate: sitk.Image, thick: sitk.Image, axis: int, iterations: int = CONSISTENCY_ITERATIONS
) -> sitk.Image:
    """Alternating projections: slab averages that match `thick`, no voxel below its darkest slab.

    The acquired slabs are the one thing known for certain; each iteration adds the slab
    residual, linearly interpolated onto the estimate's grid. The correction is smooth along
    the slice axis, so the anatomy the model drew between slices is kept. Every iteration then
    raises voxels darker than the darkest acquired slab to its value: in a scan with background
    (an MRI's zero, a CT's air) that slab is the background, and the sampler's speckle there,
    which the slab residual alone only averages out, goes.
    """
    corrected = sitk.Cast(estimate, sitk.sitkFloat32)
    thick = sitk.Cast(thick, sitk.sitkFloat32)
    floor = float(sitk.GetArrayViewFromImage(thick).min())
    for _ in range(iterations):
        residual = thick - slab_average(corrected, thick, axis)
        corrected = corrected + sitk.Resample(
            residual, corrected, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True
        )
        corrected = sitk.Maximum(corrected, floor)
    return corrected


def calibrate_intensity(
    estimate: sitk.Image, thick: sitk.Image, axis: int, region: np.ndarray
) -> sitk.Image:
    """`a * estimate + b` inside `region`, with a and b fitted so that its slabs best match `thick`.

    The acquired slabs fix the intensity units; the least-squares fit (over slabs lying wholly
    inside `region`, a boolean array on `estimate`'s grid) absorbs any difference between the
    model's intensity scale and the normalized input's.
    """
    region_image = sitk.GetImageFromArray(region.astype(np.float32))
    region_image.CopyInformation(estimate)
    # Copies, not views: a view of a temporary image would outlive its buffer.
    inside = sitk.GetArrayFromImage(slab_average(region_image, thick, axis)) > 0.999
    predicted = sitk.GetArrayFromImage(slab_average(estimate, thick, axis))[inside]
    acquired = sitk.GetArrayFromImage(thick)[inside]
    if predicted.size < 2 or np.ptp(predicted) == 0:
        return estimate
    design = np.stack([predicted, np.ones_like(predicted)], axis=1).astype(np.float64)
    (scale, shift), *_ = np.linalg.lstsq(design, acquired.astype(np.float64), rcond=None)
    array = sitk.GetArrayFromImage(estimate)
    array[region] = array[region] * scale + shift
    calibrated = sitk.GetImageFromArray(array)
    calibrated.CopyInformation(estimate)
    return calibrated


def check_superres_model(config: ModelConfig) -> tuple[float, float] | None:
    """Refuse a model that does not super-resolve; returns its trained slab range in mm, if stated.

    A super-resolution model has task "superres", no label table and one modality channel
    (the thick-slice scan). `metadata.superres.thickness_mm` = [low, high] states the slab
    thicknesses it was trained on.
    """
    if config.task != "superres" or config.labels or len(config.modalities) != 1:
        raise UserError(
            f"model '{config.name}' is a {config.task} model; super-resolution needs a superres model "
            "(one thick-slice condition channel), e.g. --model demo-superres"
        )
    trained = config.metadata.get("superres", {}).get("thickness_mm")
    return None if trained is None else (float(trained[0]), float(trained[1]))


def super_resolve(
    model: LoadedModel,
    thick: sitk.Image,
    output_grid: sitk.Image,
    *,
    samples: int = DEFAULT_SAMPLES,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    strength: float | None = None,
    consistency_iterations: int = CONSISTENCY_ITERATIONS,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    stats: SamplingStats | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """Super-resolve a thick-slice volume onto `output_grid`, in the input's intensity units.

    Each sample is drawn on the model grid, mapped onto `output_grid`, given back the input's
    units (the inverse of the condition's percentile scaling, refined by `calibrate_intensity`)
    and made consistent with the acquired slabs. Outside the model grid's field of view the
    result is the linear interpolation of the input, made consistent the same way.

    Args:
        model: a loaded super-resolution model (see `check_superres_model`).
        thick: the thick-slice volume.
        output_grid: the output geometry (e.g. `isotropic_grid(thick)`).
        samples: how many samples to average (posterior mean); seeds `seed`, `seed + 1`, ...
        steps: denoising steps per sample (default: the model's).
        scheduler: the sampler, a key of `model_config.SAMPLING_SCHEDULERS` (default: the model's).
        seed: seed of the first sample.
        strength: condition strength (default: the model's; `networks.modulate`).
        consistency_iterations: back-projection iterations (0 keeps the model output as drawn,
            only restored to input units, without calibration).
        progress: `progress(step, total)` over all samples' steps.
        should_cancel: checked between steps; True raises `errors.Cancelled`.
        stats: accumulates the seconds spent in network forwards.

    Returns:
        (mean, std) float32 images on `output_grid`; std is the per-voxel standard deviation
        across samples (all zeros for one sample).
    """
    import torch

    from VCMSynthesisLib import conditions
    from VCMSynthesisLib.sampler import sample, sample_spread

    check_superres_model(model.config)
    axis = slice_geometry(thick).axis
    thick = sitk.Cast(thick, sitk.sitkFloat32)
    modality = model.config.modalities[0].name
    condition = conditions.assemble_conditions(model.config, None, {modality: thick})
    scaling = condition.scalings[modality]
    channels = torch.from_numpy(condition.channels).unsqueeze(0)
    in_view = conditions.resample_to_grid(
        conditions.image_from_array(np.ones(condition.grid.GetSize(), np.float32), condition.grid),
        output_grid, labels=False, default_value=0.0,
    )
    # Only voxels whose interpolation stays wholly inside the model grid (no blend with the fill).
    in_view = sitk.GetArrayFromImage(in_view) > 1.0 - 1e-6
    interpolated = sitk.GetArrayFromImage(
        sitk.Resample(thick, output_grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    )
    def draw(sample_seed: int, sample_progress) -> np.ndarray:
        drawn = sample(model, channels, steps=steps, scheduler=scheduler, seed=sample_seed, strength=strength,
                       progress=sample_progress, should_cancel=should_cancel, stats=stats)[0, 0].numpy()
        on_output = conditions.resample_to_grid(
            conditions.image_from_array(scaling.restore(drawn), condition.grid), output_grid,
            labels=False, default_value=0.0,
        )
        filled = np.where(in_view, sitk.GetArrayViewFromImage(on_output), interpolated)
        estimate = sitk.GetImageFromArray(filled.astype(np.float32))
        estimate.CopyInformation(output_grid)
        if consistency_iterations:
            estimate = calibrate_intensity(estimate, thick, axis, in_view)
            estimate = enforce_consistency(estimate, thick, axis, consistency_iterations)
        return sitk.GetArrayFromImage(estimate)

    mean_array, std_array = sample_spread(draw, samples=samples, steps=steps or model.config.sampling_steps,
                                          seed=seed, progress=progress)
    mean = sitk.GetImageFromArray(mean_array.astype(np.float32))
    std = sitk.GetImageFromArray(std_array.astype(np.float32))
    mean.CopyInformation(output_grid)
    std.CopyInformation(output_grid)
    return mean, std


# --- command line ---------------------------------------------------------------------------


def positive_mm(text: str) -> float:
    """argparse type of a spacing: a positive, finite number of millimetres."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of millimetres, got '{text}'") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of millimetres, got '{text}'")
    return value


def register(subparsers) -> None:
    from VCMSynthesisLib.runtime import add_run_arguments, add_samples_arguments, add_server_arguments

    parser = subparsers.add_parser(
        "superres", help="super-resolve a thick-slice volume to an isotropic one",
        description="Axial super-resolution: a thick-slice scan in, the same physical extent out on an "
                    "isotropic grid with the same directions, in the input's intensity units.")
    parser.add_argument("--input", type=Path, required=True, help="thick-slice volume (.nrrd, .nii.gz, .mha)")
    parser.add_argument("--output", type=Path, required=True, help="volume to write (.nrrd, .nii.gz, .mha)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"superres model name or folder "
                                                               f"(default {DEFAULT_MODEL})")
    parser.add_argument("--spacing", type=positive_mm, help="output spacing in mm (default: the input's "
                                                             "finest in-plane spacing)")
    add_samples_arguments(parser, default=DEFAULT_SAMPLES)
    add_run_arguments(parser)
    add_server_arguments(parser)
    parser.set_defaults(handler=run_superres_command)


def run_superres_command(args: argparse.Namespace) -> int:
    from VCMSynthesisLib.runtime import run_sampling_command

    return run_sampling_command(args, _run_superres)


def run_superres(model: LoadedModel, args: argparse.Namespace, thick: sitk.Image, *,
                 progress: Callable[[int, int], None] | None = None, cancellation=None,
                 warn: Callable[[str], None] | None = None):
    """One parsed `superres` command line with a loaded model (the CLI and the server's jobs);
    `thick` is `args.input` as read. Returns a `worker.SynthesisResult`; outputs appear complete
    or not at all."""
    from VCMSynthesisLib.memory import plan_decode
    from VCMSynthesisLib.runtime import SignalCancellation
    from VCMSynthesisLib.sampler import SamplingStats
    from VCMSynthesisLib.volumes import write_volumes_atomic
    from VCMSynthesisLib.worker import SynthesisResult, provenance

    cancellation = cancellation or SignalCancellation()
    geometry = slice_geometry(thick)
    grid = isotropic_grid(thick, args.spacing)
    trained = check_superres_model(model.config)
    warning = None if trained is None else check_thickness(geometry, trained)
    if warning is not None and warn is not None:
        warn(warning)
    model.decode_plan = plan_decode(model.config, model.folder, model.device)

    stats = SamplingStats()
    start = time.perf_counter()
    with cancellation.deferred():
        cancellation.raise_if_requested()
        mean, std = super_resolve(
            model, thick, grid, samples=args.samples, steps=args.steps, scheduler=args.scheduler,
            seed=args.seed, strength=args.strength, progress=progress,
            should_cancel=cancellation.should_cancel, stats=stats,
        )
        superres_s = time.perf_counter() - start
        # Both written and checked before either replaces a file; the uncertainty is renamed
        # first, so the main output appears only once everything is in place.
        volumes = ([(std, args.uncertainty, None)] if args.uncertainty is not None else []) + [
            (mean, args.output, None)]
        made_with = provenance(model, args.seed, args.steps, args.scheduler, args.strength)
        output = write_volumes_atomic(volumes, cancellation.commit, made_with)[-1]
    return SynthesisResult(output=output, timings={"superres_s": superres_s, "model_s": stats.model_s},
                           uncertainty=args.uncertainty)


def check_superres_paths(args: argparse.Namespace) -> None:
    """Before any work: the outputs can be written, are different files and not the input."""
    from VCMSynthesisLib.runtime import check_run_outputs

    check_run_outputs(args.output, {"--input": args.input}, samples=args.samples, seed=args.seed,
                      uncertainty=args.uncertainty)


def _run_superres(args: argparse.Namespace, cancellation, json_mode: bool) -> int:
    from VCMSynthesisLib.runtime import JsonProgress, TextProgress, emit_result, emit_warning, process_age_s
    from VCMSynthesisLib.volumes import read_volume
    from VCMSynthesisLib.worker import load_model

    started = process_age_s()
    check_superres_paths(args)
    thick = read_volume(args.input)
    grid = isotropic_grid(thick, args.spacing)  # before the model loads: a wrong input fails at once

    start = time.perf_counter()
    model = load_model(args.model, args.device)
    load_s = time.perf_counter() - start
    result = run_superres(model, args, thick, progress=JsonProgress() if json_mode else TextProgress(),
                          cancellation=cancellation, warn=lambda message: emit_warning(json_mode, message))
    timings = {"startup_s": started, "load_s": load_s, **result.timings, "total_s": process_age_s()}
    superres_s = result.timings["superres_s"]
    size = " x ".join(map(str, grid.GetSize()))
    emit_result(json_mode, result.output, timings, uncertainty=result.uncertainty,
                describe=lambda t: f"{size} voxels at {grid.GetSpacing()[0]:g} mm; {superres_s:.1f} s "
                                   f"super-resolution, {t.get('total_s', 0):.1f} s in all")
    return 0
