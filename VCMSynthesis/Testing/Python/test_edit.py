"""edit.py: `vcm-synthesis edit` on a tiny real model: the scan kept outside, the blend, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_worker import assert_sigterm_stops_it, run_cli
from tiny_models import TINY_STEPS, expected_provenance, make_tiny_model_folder, provenance_in_nrrd
from VCMSynthesisLib import edit
from VCMSynthesisLib.errors import Cancelled, UserError
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.volumes import read_volume
from volume_cases import GEOMETRIES, blob, make_image, write_case

SHAPE = (18, 20, 22)  # k, j, i at 1 mm (axis_aligned) or 0.8-2.2 mm (oblique): inside 32 mm


def tissue_labels(shape=SHAPE) -> np.ndarray:
    """Background, a white-matter ball with a grey rim and a small CSF core."""
    centre = tuple(n // 2 for n in shape)
    labels = np.zeros(shape, np.int16)
    labels[blob(shape, centre, (8, 9, 10))] = 2
    labels[blob(shape, centre, (6, 7, 8))] = 3
    labels[blob(shape, centre, (2, 2, 2))] = 1
    return labels


def scan_of(labels: np.ndarray, dtype=np.float32) -> np.ndarray:
    """A T1-like scan in scanner units: CSF dark, white matter bright, a little noise."""
    levels = np.array([5.0, 200.0, 600.0, 900.0])
    noise = np.random.default_rng(0).normal(0.0, 20.0, labels.shape)
    return (levels[labels] + noise).astype(dtype)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny labels-only model and, on disk, a scan, its segmentation and an edit that grows the CSF."""
    folder = tmp_path_factory.mktemp("edit")
    model = make_tiny_model_folder(folder / "tiny", modalities=None)
    original = tissue_labels()
    edited = original.copy()
    edited[blob(SHAPE, (9, 10, 11), (4, 4, 4))] = 1
    paths = {"model": model, "folder": folder}
    for name, array in (("scan", scan_of(original)), ("original", original), ("edited", edited)):
        paths[name] = write_case(make_image(array, "oblique"), folder, name, "nrrd-lps")
    return paths


def edit_arguments(case, output, *extra):
    return ["edit", "--model", case["model"], "--image", case["scan"], "--segmentation", case["edited"],
            "--original-segmentation", case["original"], "--output", output, "--device", "cpu", *extra]


def voxels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_volume(path))


def test_an_edited_scan_says_how_it_was_made(case, tmp_path):
    output = tmp_path / "edited.nrrd"
    code, _, err = run_cli(edit_arguments(case, output, "--seed", 9))
    assert code == 0, err
    assert provenance_in_nrrd(output) == expected_provenance(case["model"], seed=9, steps=TINY_STEPS)


def test_an_edit_takes_the_scheduler_asked_for_and_records_it(case, tmp_path):
    """No --scheduler is the model's (DDIM) bit for bit; another redraws the region differently and
    keeps the scan beyond the margin; each output's provenance names its sampler."""
    edited = {}
    for name, extra in (("default", []), ("ddim", ["--scheduler", "ddim"]),
                        ("dpmpp-2m", ["--scheduler", "dpmpp-2m"])):
        output = tmp_path / f"{name}.nrrd"
        code, _, err = run_cli(edit_arguments(case, output, "--seed", 9, *extra))
        assert code == 0, err
        assert provenance_in_nrrd(output) == expected_provenance(case["model"], seed=9, steps=TINY_STEPS,
                                                                 scheduler=extra[1] if extra else None)
        edited[name] = voxels(output)
    assert provenance_in_nrrd(tmp_path / "default.nrrd")["vcm_scheduler"] == "ddim"
    np.testing.assert_array_equal(edited["default"], edited["ddim"])
    inputs = edit.read_edit_inputs(case["scan"], case["edited"], original=case["original"])
    changed = sitk.GetArrayFromImage(inputs.segmentation.labelmap) != sitk.GetArrayFromImage(
        inputs.original.labelmap)
    beyond = edit.distance_mm(changed, inputs.scan.GetSpacing()) >= edit.DEFAULT_MARGIN_MM
    assert beyond.any()
    np.testing.assert_array_equal(edited["dpmpp-2m"][beyond], voxels(case["scan"])[beyond])
    assert np.abs(edited["dpmpp-2m"][changed] - edited["ddim"][changed]).max() > 1.0  # scanner units


def test_falloff_is_one_on_the_region_and_zero_beyond_the_margin():
    distance = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 9.0])
    weight = edit.falloff(distance, 8.0)
    quarter = 0.5 * np.cos(np.pi / 4)
    np.testing.assert_allclose(weight, [1.0, 0.5 + quarter, 0.5, 0.5 - quarter, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(edit.falloff(distance, 0.0), [1, 0, 0, 0, 0, 0])


def test_blend_weight_follows_the_distance_in_millimetres():
    region = np.zeros((1, 1, 20), bool)
    region[0, 0, 0] = True
    weight = edit.blend_weight(region, np.ones_like(region), spacing_xyz=(2.0, 1.0, 1.0), margin_mm=8.0)
    # Voxel i lies 2 i mm from the region along x: 1 on it, 0.5 at 4 mm, 0 from 8 mm on.
    np.testing.assert_allclose(weight[0, 0, :6], [1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5,
                                                   0.5 - 0.5 * np.cos(np.pi / 4), 0.0, 0.0], atol=1e-12)
    assert not weight[0, 0, 4:].any()


def test_blend_weight_fades_out_at_the_edge_of_the_field_of_view():
    region = np.ones((1, 1, 20), bool)
    in_view = np.zeros_like(region)
    in_view[0, 0, :12] = True
    weight = edit.blend_weight(region, in_view, spacing_xyz=(1.0, 1.0, 1.0), margin_mm=4.0)
    assert weight[0, 0, 0] == 1.0 and not weight[0, 0, 12:].any()  # nothing out of view
    assert np.all(np.diff(weight[0, 0, 8:13]) < 0)  # a smooth fall over the 4 mm before the edge


def test_the_scan_is_kept_exactly_beyond_the_margin_and_blended_inside(case, tmp_path):
    output = tmp_path / "edited.nrrd"
    code, out, err = run_cli(edit_arguments(case, output, "--progress", "json", "--margin-mm", 3))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["step"] for line in lines[:-1]] == list(range(1, TINY_STEPS + 1))
    assert lines[-1]["result"] == str(output) and lines[-1]["edited_voxels"] > 0
    scan, after = voxels(case["scan"]), voxels(output)
    assert after.dtype == scan.dtype
    inputs = edit.read_edit_inputs(case["scan"], case["edited"], original=case["original"])
    changed = sitk.GetArrayFromImage(inputs.segmentation.labelmap) != sitk.GetArrayFromImage(
        inputs.original.labelmap)
    distance = edit.distance_mm(changed, inputs.scan.GetSpacing())
    beyond = distance >= 3.0
    np.testing.assert_array_equal(after[beyond], scan[beyond])  # bit for bit
    assert not np.array_equal(after[changed], scan[changed])  # the edited voxels were redrawn
    # Across the margin the change fades: voxels near its outer edge barely move.
    change = np.abs(after.astype(np.float64) - scan)
    near_edge = (distance > 2.0) & (distance < 3.0)
    assert change[near_edge].max() < change[changed].max()


def test_the_output_keeps_the_scan_geometry_and_pixel_type(case, tmp_path):
    scan = make_image(scan_of(tissue_labels(), np.int16), "oblique")
    scan_path = write_case(scan, tmp_path, "scan_int16", "nifti")
    output = tmp_path / "edited.nii.gz"
    arguments = edit_arguments(case, output, "--steps", 1)
    arguments[arguments.index("--image") + 1] = scan_path
    code, _, err = run_cli(arguments)
    assert code == 0, err
    written, original = read_volume(output), read_volume(scan_path)
    assert written.GetPixelID() == original.GetPixelID() == sitk.sitkInt16
    for read in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(written, read)() == getattr(original, read)()  # exactly, from the copied header


def test_region_mask_and_several_samples_give_a_spread_only_inside(case, tmp_path):
    region = np.zeros(SHAPE, np.uint8)
    region[7:11, 8:12, 9:13] = 1
    region_path = write_case(make_image(region, "oblique"), tmp_path, "region", "nrrd-lps")
    output, spread = tmp_path / "edited.nrrd", tmp_path / "std.nrrd"
    code, out, err = run_cli(["edit", "--model", case["model"], "--image", case["scan"],
                              "--segmentation", case["edited"], "--region", region_path, "--output", output,
                              "--samples", 2, "--uncertainty", spread, "--margin-mm", 2,
                              "--progress", "json"])
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-2]["step"] == 2 * TINY_STEPS and lines[-1]["uncertainty"] == str(spread)
    std = voxels(spread)
    beyond = edit.distance_mm(region != 0, read_volume(case["scan"]).GetSpacing()) >= 2.0
    assert std[region != 0].min() > 0 and not std[beyond].any()
    np.testing.assert_array_equal(voxels(output)[beyond], voxels(case["scan"])[beyond])


def test_same_seed_same_edit(case):
    model = load_model_folder(case["model"])
    inputs = edit.read_edit_inputs(case["scan"], case["edited"], original=case["original"])
    first, again, other = (sitk.GetArrayFromImage(edit.edit_scan(model, inputs, seed=seed).image)
                           for seed in (4, 4, 5))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_an_edit_encoded_and_decoded_in_slabs_is_the_whole_volume_edit(case, monkeypatch):
    """Slabs of 3 rows forced for every block: the scan's encode (its downsamplings included) and
    the decode run in slabs, and the edited scan is the whole-volume one within float rounding."""
    from monai.networks.nets.autoencoderkl import AEKLDownsample
    from VCMSynthesisLib import decoding

    model = load_model_folder(case["model"])
    inputs = edit.read_edit_inputs(case["scan"], case["edited"], original=case["original"])
    model.decode_plan = decoding.WHOLE
    whole = sitk.GetArrayFromImage(edit.edit_scan(model, inputs, seed=4).image)
    slabbed_kinds = []
    run_slabbed = decoding._run_slabbed
    monkeypatch.setattr(decoding, "_run_slabbed",
                        lambda block, *rest: slabbed_kinds.append(type(block)) or run_slabbed(block, *rest))
    model.decode_plan = decoding.DecodePlan(slab_bytes=1, slab_rows=3)
    slabbed = sitk.GetArrayFromImage(edit.edit_scan(model, inputs, seed=4).image)
    assert slabbed_kinds.count(AEKLDownsample) == 2  # the tiny encoder's two downsamplings
    scan = voxels(case["scan"])
    assert np.abs(slabbed - whole).max() < 1e-4 * np.abs(scan).max()


def test_cancelling_between_steps_raises_and_the_cli_writes_nothing(case, tmp_path):
    model = load_model_folder(case["model"])
    inputs = edit.read_edit_inputs(case["scan"], case["edited"], original=case["original"])
    with pytest.raises(Cancelled):
        edit.edit_scan(model, inputs, should_cancel=lambda: True)

    output = tmp_path / "out" / "edited.nrrd"
    output.parent.mkdir()
    assert_sigterm_stops_it(edit_arguments(case, output, "--steps", 1000), output.parent)


# --- bad inputs: one line, non-zero exit, nothing written ----------------------------------------


def _replace(arguments, flag, value):
    arguments = list(arguments)
    arguments[arguments.index(flag) + 1] = value
    return arguments


def _written(tmp_path, name, array, geometry="oblique"):
    return write_case(make_image(array, geometry), tmp_path, name, "nrrd-lps")


BAD_INPUTS = {
    "geometry": (lambda case, tmp: _replace(edit_arguments(case, tmp / "o.nrrd"), "--segmentation",
                                            _written(tmp, "moved", tissue_labels(), "axis_aligned")),
                 1, "is not on the scan's voxel grid (spacing 1 x 1 x 1, the scan's 0.8 x 1.1 x 2.2)"),
    "unchanged": (lambda case, tmp: _replace(edit_arguments(case, tmp / "o.nrrd"), "--segmentation",
                                             case["original"]),
                  1, "equals the original one, so there is nothing to re-synthesize"),
    "empty region": (lambda case, tmp: ["edit", "--model", case["model"], "--image", case["scan"],
                                         "--segmentation", case["edited"], "--output", tmp / "o.nrrd",
                                         "--region", _written(tmp, "region", np.zeros(SHAPE, np.uint8))],
                     1, "the region mask is empty"),
    "label": (lambda case, tmp: _replace(edit_arguments(case, tmp / "o.nrrd"), "--segmentation",
                                         _written(tmp, "seven", np.where(tissue_labels() == 1, 7,
                                                                         tissue_labels()).astype(np.int16))),
              1, "label value 7"),
    "output is input": (lambda case, tmp: edit_arguments(case, case["scan"]), 1,
                        "is the same file as --image"),
    "uncertainty of one": (lambda case, tmp: edit_arguments(case, tmp / "o.nrrd", "--uncertainty",
                                                            tmp / "s.nrrd"),
                           2, "--uncertainty needs --samples 2 or more"),
    "no original": (lambda case, tmp: [a for a in edit_arguments(case, tmp / "o.nrrd")
                                       if a not in ("--original-segmentation", case["original"])],
                    2, "one of the arguments --original-segmentation --region is required"),
    "negative margin": (lambda case, tmp: edit_arguments(case, tmp / "o.nrrd", "--margin-mm", "-1"),
                        2, "must be a number of millimetres, 0 or more"),
    "unknown scheduler": (lambda case, tmp: edit_arguments(case, tmp / "o.nrrd", "--scheduler", "euler"),
                          2, "--scheduler: invalid choice: 'euler'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_fail_in_one_line_and_write_nothing(case, tmp_path, name):
    make, exit_code, message = BAD_INPUTS[name]
    arguments = make(case, tmp_path)
    before = {path.name for path in tmp_path.iterdir()}
    scan_bytes = case["scan"].read_bytes()
    code, _, err = run_cli(arguments)
    assert code == exit_code
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert {path.name for path in tmp_path.iterdir()} == before
    assert case["scan"].read_bytes() == scan_bytes


def test_a_region_outside_the_field_of_view_is_refused(tmp_path):
    """The tiny model sees 32 mm around the labels' centre; an edit 40 mm away touches nothing it sees."""
    model = make_tiny_model_folder(tmp_path / "tiny", modalities=None)
    shape = (8, 8, 80)  # 80 mm along i at 1 mm
    original = np.zeros(shape, np.int16)
    original[2:6, 2:6, 2:20] = 3
    edited = original.copy()
    edited[2:6, 2:6, 70:76] = 1
    paths = [_written(tmp_path, name, array, "axis_aligned")
             for name, array in (("scan", scan_of(original)), ("original", original), ("edited", edited))]
    inputs = edit.read_edit_inputs(paths[0], paths[2], original=paths[1])
    with pytest.raises(UserError, match="the edit region lies outside model 'tiny''s field of view"):
        edit.edit_scan(load_model_folder(model), inputs)


def test_a_model_without_labels_is_refused(case, tmp_path):
    model = load_model_folder(make_tiny_model_folder(tmp_path / "t2", labels=None))
    inputs = edit.read_edit_inputs(case["scan"], case["edited"], original=case["original"])
    with pytest.raises(UserError, match="takes no segmentation, so it cannot follow an edited one"):
        edit.edit_scan(model, inputs)


def test_segments_are_compared_as_the_model_reads_them(case, tmp_path):
    """The same tissues numbered differently in two .seg.nrrd files are no edit; a changed one is."""
    import nrrd

    labels = tissue_labels()

    def seg_nrrd(name, numbering, array):
        """A .seg.nrrd whose segments carry the model's label names under other label values."""
        header = {"space": "left-posterior-superior", "kinds": ["domain"] * 3, "encoding": "gzip",
                  "space origin": np.array(GEOMETRIES["axis_aligned"][1]), "space directions": np.eye(3)}
        for index, (value, label) in enumerate(numbering.items()):
            header.update({f"Segment{index}_ID": f"s{index}", f"Segment{index}_Name": f"label {label}",
                           f"Segment{index}_LabelValue": str(value), f"Segment{index}_Layer": "0"})
        values = np.zeros_like(array)
        for value, label in numbering.items():
            values[array == label] = value
        path = tmp_path / f"{name}.seg.nrrd"
        nrrd.write(str(path), values.transpose(2, 1, 0), header, index_order="F")
        return path

    scan = write_case(make_image(scan_of(labels), "axis_aligned"), tmp_path, "scan", "nrrd-lps")
    original = seg_nrrd("original", {1: 1, 2: 2, 3: 3}, labels)
    renumbered = seg_nrrd("renumbered", {7: 1, 8: 2, 9: 3}, labels)
    grown = labels.copy()
    grown[labels == 2] = 1  # the grey rim becomes CSF
    edited = seg_nrrd("edited", {9: 1, 8: 2, 7: 3}, grown)
    config = load_model_folder(case["model"]).config
    with pytest.raises(UserError, match="equals the original one"):
        edit.edit_region(config, edit.read_edit_inputs(scan, renumbered, original=original))
    region = edit.edit_region(config, edit.read_edit_inputs(scan, edited, original=original))
    np.testing.assert_array_equal(region, labels == 2)
