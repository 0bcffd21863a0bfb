"""Super-resolution: slice geometry, output grid, slab forward model, data consistency, CLI."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import (
    TINY_STEPS,
    expected_provenance,
    make_tiny_model_folder,
    provenance_in_nrrd,
    tiny_config,
    tiny_networks,
)
from VCMSynthesisLib import cli, superres
from VCMSynthesisLib.errors import Cancelled, UserError
from VCMSynthesisLib.model_folder import load_model_folder, save_model_folder
from VCMSynthesisLib.volumes import same_geometry

# An oblique direction (rotations about two axes) with a left-handed flip, as scanners write.
_ROTATION = sitk.Euler3DTransform([0, 0, 0], 0.3, -0.2, 0.5)
OBLIQUE = (np.asarray(_ROTATION.GetMatrix()).reshape(3, 3) @ np.diag([-1.0, 1.0, 1.0])).ravel().tolist()
AXIAL = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]


def make_volume(array_zyx: np.ndarray, spacing, direction=AXIAL, origin=(10.0, -20.0, 5.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array_zyx, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def smooth_random(shape_zyx, seed=0, sigma=2.0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=shape_zyx).astype(np.float32)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noise), sigma))


@pytest.mark.parametrize("direction", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
@pytest.mark.parametrize("thick_axis", [0, 2])
def test_slice_axis_is_the_largest_spacing(direction, thick_axis):
    spacing = [1.0, 1.2, 1.0]
    spacing[thick_axis] = 5.0
    geometry = superres.slice_geometry(make_volume(np.zeros((6, 7, 8)), spacing, direction))
    assert geometry.axis == thick_axis
    assert geometry.thickness_mm == 5.0
    assert geometry.in_plane_mm == 1.0


def test_isotropic_volume_is_refused():
    with pytest.raises(UserError, match="not a thick-slice volume"):
        superres.slice_geometry(make_volume(np.zeros((6, 7, 8)), [1.0, 1.0, 1.1]))


def test_2d_image_is_refused():
    with pytest.raises(UserError, match="3D volume"):
        superres.slice_geometry(sitk.Image([8, 8], sitk.sitkFloat32))


def test_thickness_outside_trained_range_warns_and_absurd_thickness_is_refused():
    inside = superres.SliceGeometry(axis=2, thickness_mm=5.0, in_plane_mm=1.0)
    thin = superres.SliceGeometry(axis=2, thickness_mm=2.5, in_plane_mm=1.0)
    thick = superres.SliceGeometry(axis=2, thickness_mm=12.0, in_plane_mm=1.0)
    absurd = superres.SliceGeometry(axis=2, thickness_mm=40.0, in_plane_mm=1.0)
    assert superres.check_thickness(inside, (3.0, 7.0)) is None
    assert "trained on 3-7 mm" in superres.check_thickness(thin, (3.0, 7.0))
    assert "12 mm" in superres.check_thickness(thick, (3.0, 7.0))
    with pytest.raises(UserError, match="far beyond"):
        superres.check_thickness(absurd, (3.0, 7.0))


@pytest.mark.parametrize("direction", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
@pytest.mark.parametrize("spacing_mm", [None, 0.7])
def test_isotropic_grid_keeps_extent_and_direction(direction, spacing_mm):
    image = make_volume(np.zeros((9, 20, 22)), [1.0, 1.1, 5.0], direction)
    grid = superres.isotropic_grid(image, spacing_mm)
    expected_spacing = 1.0 if spacing_mm is None else spacing_mm
    assert grid.GetSpacing() == pytest.approx([expected_spacing] * 3)
    assert grid.GetDirection() == pytest.approx(image.GetDirection(), abs=1e-12)
    # Same footprint: each face moves by at most a quarter of the output spacing.
    corners = zip(superres.footprint_corners(image), superres.footprint_corners(grid), strict=True)
    for input_corner, output_corner in corners:
        in_index = np.asarray(image.TransformPhysicalPointToContinuousIndex(output_corner.tolist()))
        reference = np.asarray(image.TransformPhysicalPointToContinuousIndex(input_corner.tolist()))
        shift_mm = np.abs(in_index - reference) * np.asarray(image.GetSpacing())
        assert np.all(shift_mm <= expected_spacing / 4 + 1e-9)


def test_bad_output_spacing_is_refused():
    image = make_volume(np.zeros((4, 8, 8)), [1.0, 1.0, 4.0])
    with pytest.raises(UserError, match="--spacing"):
        superres.isotropic_grid(image, 0.0)
    with pytest.raises(UserError, match="too large"):
        superres.isotropic_grid(image, 1e-3)


@pytest.mark.parametrize("direction", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_slab_average_is_the_mean_over_each_slab(direction):
    """Along a linear ramp the slab average equals the ramp at the slab centre; constants stay."""
    fine_z = np.arange(40, dtype=np.float32)
    ramp = np.broadcast_to((3.0 * fine_z + 7.0)[:, None, None], (40, 6, 5))
    fine = make_volume(ramp, [1.0, 1.0, 1.0], direction)
    thick = make_volume(np.zeros((8, 6, 5)), [1.0, 1.0, 4.0], direction,
                        origin=fine.TransformContinuousIndexToPhysicalPoint([0, 0, 5.5]))
    averaged = sitk.GetArrayFromImage(superres.slab_average(fine, thick, axis=2))
    slab_centres_in_fine = 5.5 + 4.0 * np.arange(8)
    expected = np.broadcast_to((3.0 * slab_centres_in_fine + 7.0)[:, None, None], (8, 6, 5))
    np.testing.assert_allclose(averaged, expected, rtol=1e-5)
    constant = make_volume(np.full((40, 6, 5), 3.25), [1.0, 1.0, 1.0], direction)
    np.testing.assert_allclose(sitk.GetArrayFromImage(superres.slab_average(constant, thick, 2)), 3.25,
                               rtol=1e-6)


def test_consistency_reproduces_the_slabs_and_improves_the_estimate():
    truth = make_volume(smooth_random((40, 24, 20)), [1.0, 1.0, 1.0])
    thick = make_volume(np.zeros((10, 24, 20)), [1.0, 1.0, 4.0],
                        origin=truth.TransformContinuousIndexToPhysicalPoint([0, 0, 1.5]))
    thick = superres.slab_average(truth, thick, axis=2)
    estimate = sitk.Resample(thick, truth, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    corrected = superres.enforce_consistency(estimate, thick, axis=2, iterations=8)
    residual = sitk.GetArrayFromImage(thick - superres.slab_average(corrected, thick, 2))
    assert np.abs(residual).max() < 0.01 * np.abs(sitk.GetArrayFromImage(thick)).max()

    def error(image):
        return float(np.sqrt(np.mean(sitk.GetArrayFromImage(image - truth)[4:36] ** 2)))

    assert error(corrected) < 0.9 * error(estimate)


def test_consistency_removes_speckle_below_the_darkest_slab():
    """A sampler's speckle in a zero background goes; nothing ends darker than the darkest slab."""
    block = np.zeros((40, 24, 20), np.float32)
    block[12:28, 6:18, 5:15] = 1.0
    truth = make_volume(block, [1.0, 1.0, 1.0])
    thick = make_volume(np.zeros((10, 24, 20)), [1.0, 1.0, 4.0],
                        origin=truth.TransformContinuousIndexToPhysicalPoint([0, 0, 1.5]))
    thick = superres.slab_average(truth, thick, axis=2)
    speckle = np.random.default_rng(0).normal(0.0, 0.2, block.shape).astype(np.float32)
    corrected = sitk.GetArrayFromImage(superres.enforce_consistency(
        make_volume(block + speckle, [1.0, 1.0, 1.0]), thick, axis=2, iterations=8))
    assert corrected.min() >= sitk.GetArrayFromImage(thick).min()
    background = block == 0
    background[:, 4:20, 3:17] = False  # away from the block's edges

    def rms(values):
        return float(np.sqrt(np.mean(values ** 2)))

    assert rms(corrected[background]) < 0.5 * rms(speckle[background])


@pytest.fixture(scope="module")
def tiny_superres_model(tmp_path_factory):
    """A tiny random super-resolution model trained (nominally) on 3-7 mm slabs."""
    config = dataclasses.replace(
        tiny_config(labels=None, modalities=("thick",), task="superres", name="tiny-superres"),
        metadata={"superres": {"thickness_mm": [3.0, 7.0]}},
    )
    folder = tmp_path_factory.mktemp("models") / "tiny-superres"
    return save_model_folder(folder, config, *tiny_networks(config))


def thick_scan(direction=AXIAL, scale=100.0, offset=0.0) -> sitk.Image:
    """A 1.5 x 1.5 x 5 mm scan of smooth random anatomy with a dark background."""
    array = smooth_random((6, 20, 22), seed=3, sigma=1.0)
    array = np.pad(array - array.min(), ((0, 0), (2, 2), (2, 2)))
    return make_volume(array * scale + offset, [1.5, 1.5, 5.0], direction)


@pytest.mark.parametrize("direction", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_super_resolve_output_is_on_the_grid_and_reproduces_the_slabs(tiny_superres_model, direction):
    model = load_model_folder(tiny_superres_model)
    thick = thick_scan(direction)
    grid = superres.isotropic_grid(thick)
    mean, std = superres.super_resolve(model, thick, grid, samples=1)
    assert same_geometry(mean, grid) and same_geometry(std, grid)
    assert np.all(sitk.GetArrayViewFromImage(std) == 0)  # one sample: no spread
    # In the input's units: the result's slab averages give back the acquired slices.
    slabs = sitk.GetArrayFromImage(superres.slab_average(mean, thick, 2))
    acquired = sitk.GetArrayFromImage(thick)
    assert np.abs(slabs - acquired).max() < 0.05 * np.ptp(acquired)


def test_intensity_units_follow_an_affine_change_of_the_input(tiny_superres_model):
    """Sampling sees the same normalized condition, so a*input+b gives a*output+b."""
    model = load_model_folder(tiny_superres_model)
    thick = thick_scan()
    grid = superres.isotropic_grid(thick)
    mean, _ = superres.super_resolve(model, thick, grid, seed=7)
    scaled, _ = superres.super_resolve(model, thick_scan(scale=250.0, offset=-40.0), grid, seed=7)
    expected = sitk.GetArrayFromImage(mean) * 2.5 - 40.0
    np.testing.assert_allclose(sitk.GetArrayFromImage(scaled), expected, atol=1e-3 * 250)


def test_several_samples_give_a_mean_and_a_spread(tiny_superres_model):
    model = load_model_folder(tiny_superres_model)
    thick = thick_scan()
    grid = superres.isotropic_grid(thick, 2.5)
    calls = []
    mean, std = superres.super_resolve(model, thick, grid, samples=3, progress=lambda *a: calls.append(a))
    one, _ = superres.super_resolve(model, thick, grid, samples=1)
    spread = sitk.GetArrayFromImage(std)
    assert spread.shape == sitk.GetArrayViewFromImage(mean).shape
    assert spread.min() >= 0 and spread.max() > 0
    assert calls[-1] == (3 * TINY_STEPS, 3 * TINY_STEPS) and len(calls) == 3 * TINY_STEPS
    assert not np.allclose(sitk.GetArrayFromImage(mean), sitk.GetArrayFromImage(one))


def test_a_model_for_another_task_is_refused(tmp_path):
    model = load_model_folder(make_tiny_model_folder(tmp_path / "synthesis"))
    with pytest.raises(UserError, match="superres model"):
        superres.super_resolve(model, thick_scan(), superres.isotropic_grid(thick_scan()))


# --- command line ---------------------------------------------------------------------------


def run_cli(capsys, *arguments) -> tuple[int, list[dict], str]:
    """`vcm-synthesis superres ... --progress json` in-process: (exit code, JSON lines, stderr)."""
    code = cli.main(["superres", *map(str, arguments), "--progress", "json", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def write_scan(path, image: sitk.Image):
    sitk.WriteImage(image, str(path))
    return path


def test_cli_writes_the_mean_and_the_uncertainty(tmp_path, capsys, tiny_superres_model):
    scan = write_scan(tmp_path / "thick.nrrd", thick_scan(OBLIQUE))
    output, spread = tmp_path / "thin.nii.gz", tmp_path / "std.nrrd"
    code, lines, _ = run_cli(capsys, "--input", scan, "--output", output, "--model", tiny_superres_model,
                             "--samples", 2, "--uncertainty", spread, "--spacing", 2.0)
    assert code == 0
    assert [line["step"] for line in lines[:-1]] == list(range(1, 2 * TINY_STEPS + 1))
    assert lines[-1]["result"] == str(output) and lines[-1]["uncertainty"] == str(spread)
    grid = superres.isotropic_grid(thick_scan(OBLIQUE), 2.0)
    for path in (output, spread):
        written = sitk.ReadImage(str(path))
        assert written.GetSize() == grid.GetSize()
        assert written.GetSpacing() == pytest.approx(grid.GetSpacing())
        assert written.GetOrigin() == pytest.approx(grid.GetOrigin(), abs=1e-4)
        assert written.GetDirection() == pytest.approx(grid.GetDirection(), abs=1e-6)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(spread))).min() >= 0


def test_cli_output_says_how_it_was_made(tmp_path, capsys, tiny_superres_model):
    scan = write_scan(tmp_path / "thick.nrrd", thick_scan(OBLIQUE))
    output = tmp_path / "thin.nrrd"
    code, _, err = run_cli(capsys, "--input", scan, "--output", output, "--model", tiny_superres_model,
                           "--seed", 4, "--steps", 2, "--strength", 0.5, "--spacing", 2.0)
    assert code == 0, err
    expected = expected_provenance(tiny_superres_model, seed=4, steps=2, strength=0.5)
    assert provenance_in_nrrd(output) == expected


def test_cli_takes_the_scheduler_asked_for_and_records_it(tmp_path, capsys, tiny_superres_model):
    scan = write_scan(tmp_path / "thick.nrrd", thick_scan())
    drawn = {}
    for name, extra in (("default", []), ("ddim", ["--scheduler", "ddim"]),
                        ("ddpm", ["--scheduler", "ddpm"])):
        output = tmp_path / f"{name}.nrrd"
        code, _, err = run_cli(capsys, "--input", scan, "--output", output, "--model", tiny_superres_model,
                               "--seed", 4, "--samples", 1, "--spacing", 2.0, *extra)
        assert code == 0, err
        expected = expected_provenance(tiny_superres_model, seed=4, steps=TINY_STEPS,
                                       scheduler=extra[1] if extra else None)
        assert provenance_in_nrrd(output) == expected
        drawn[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert provenance_in_nrrd(tmp_path / "default.nrrd")["vcm_scheduler"] == "ddim"  # the model's
    np.testing.assert_array_equal(drawn["default"], drawn["ddim"])
    assert np.abs(drawn["ddpm"] - drawn["ddim"]).max() > 1e-2


def test_cli_warns_about_a_thickness_outside_the_trained_range(tmp_path, capsys, tiny_superres_model):
    scan = write_scan(tmp_path / "thick.nrrd", make_volume(smooth_random((5, 12, 12)) + 5, [1.5, 1.5, 9.0]))
    code, lines, _ = run_cli(capsys, "--input", scan, "--output", tmp_path / "thin.nrrd",
                             "--model", tiny_superres_model)
    assert code == 0
    assert "trained on 3-7 mm" in lines[0]["warning"]


@pytest.mark.parametrize(
    ("spacing", "size_zyx", "message"),
    [
        ([1.0, 1.0, 1.1], (8, 12, 12), "not a thick-slice volume"),
        ([1.0, 1.0, 30.0], (4, 12, 12), "far beyond"),
        ([1.0, 1.0, 5.0], (1, 12, 12), "2D image"),
    ],
    ids=["isotropic", "absurd-thickness", "2d"],
)
def test_cli_refuses_bad_inputs_in_one_line_and_writes_nothing(tmp_path, capsys, tiny_superres_model,
                                                                spacing, size_zyx, message):
    array = np.random.default_rng(1).random(size_zyx) + 5
    scan = write_scan(tmp_path / "scan.nrrd", make_volume(array, spacing))
    output = tmp_path / "thin.nrrd"
    code, lines, _ = run_cli(capsys, "--input", scan, "--output", output, "--model", tiny_superres_model)
    assert code == 1
    assert message in lines[-1]["error"] and "\n" not in lines[-1]["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nrrd"]


def test_cli_refuses_an_uncertainty_map_from_one_sample(tmp_path, capsys, tiny_superres_model):
    scan = write_scan(tmp_path / "thick.nrrd", thick_scan())
    code, lines, _ = run_cli(capsys, "--input", scan, "--output", tmp_path / "thin.nrrd",
                             "--model", tiny_superres_model, "--samples", 1,
                             "--uncertainty", tmp_path / "std.nrrd")
    assert code == 2
    assert "--samples 2 or more" in lines[-1]["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thick.nrrd"]


def test_cancelling_between_steps_raises_and_leaves_nothing(tiny_superres_model):
    model = load_model_folder(tiny_superres_model)
    with pytest.raises(Cancelled):
        superres.super_resolve(model, thick_scan(), superres.isotropic_grid(thick_scan()),
                               should_cancel=lambda: True)


# --- training data ----------------------------------------------------------------------------


def test_simulated_thick_slices_tile_the_volume_with_slab_averages():
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))
    from simulate_thick_slices import axial_axis, simulate_thick_slices

    z = np.arange(30, dtype=np.float32)
    truth = make_volume(np.broadcast_to((2.0 * z + 1.0)[:, None, None], (30, 8, 10)), [2.0, 2.0, 2.0],
                        direction=[-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0])
    assert axial_axis(truth) == 2
    thick = simulate_thick_slices(truth, thickness_mm=5.0, offset_mm=1.3)
    assert thick.GetSpacing() == pytest.approx((2.0, 2.0, 5.0))
    assert thick.GetDirection() == truth.GetDirection()
    first, last = superres.footprint_corners(thick)
    truth_first, truth_last = superres.footprint_corners(truth)
    assert first[2] == pytest.approx(truth_first[2] - 1.3)  # the offset moves the first slab
    assert last[2] >= truth_last[2] and last[2] - 5.0 < truth_last[2]  # the slabs cover the volume
    # Inside the volume a slab of a ramp averages to the ramp at the slab's centre.
    centres_mm = truth_first[2] - 1.3 + 2.5 + 5.0 * np.arange(thick.GetSize()[2])
    centres_index = (centres_mm - truth.GetOrigin()[2]) / 2.0
    inner = slice(1, thick.GetSize()[2] - 1)
    np.testing.assert_allclose(sitk.GetArrayFromImage(thick)[inner, 3, 4], 2.0 * centres_index[inner] + 1.0,
                               rtol=1e-5)


def test_sigterm_stops_the_cli_with_143_and_writes_nothing(tiny_superres_model, tmp_path):
    from test_worker import assert_sigterm_stops_it

    sitk.WriteImage(thick_scan(), str(tmp_path / "thick.nrrd"))
    output = tmp_path / "out" / "iso.nrrd"
    output.parent.mkdir()
    arguments = ["superres", "--input", tmp_path / "thick.nrrd", "--output", output,
                 "--model", tiny_superres_model, "--steps", 1000, "--device", "cpu"]
    assert_sigterm_stops_it(arguments, output.parent)
