"""volumes.py: checked reading, exact-geometry atomic writing, Slicer .seg.nrrd segments."""

from __future__ import annotations

import json
import os
import re

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import provenance_in_nrrd
from VCMSynthesisLib.errors import Cancelled, UserError
from VCMSynthesisLib.volumes import (
    check_output_writable,
    read_segmentation,
    read_volume,
    write_volume_atomic,
)
from volume_cases import FORMATS, GEOMETRIES, geometry_of, make_image, write_case, write_slicer_segmentation


def _random_volume(geometry: str, shape=(6, 7, 8), seed=0) -> sitk.Image:
    return make_image(np.random.default_rng(seed).random(shape).astype(np.float32), geometry)


MADE_WITH = {"vcm_model": "tiny", "vcm_seed": "7", "vcm_steps": "3"}


@pytest.mark.parametrize("reference_format", [None, "nrrd-lps", "nifti"])
def test_metadata_goes_into_the_nrrd_header_with_or_without_a_reference_header(tmp_path, reference_format):
    reference = None if reference_format is None else write_case(_random_volume("oblique"), tmp_path,
                                                                  "reference", reference_format)
    output = write_volume_atomic(_random_volume("oblique"), tmp_path / "out.nrrd", reference,
                                 metadata=MADE_WITH)
    assert provenance_in_nrrd(output) == MADE_WITH
    assert not (tmp_path / "out.nrrd.json").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_metadata_of_other_formats_is_a_sidecar_written_with_the_volume(tmp_path, suffix):
    output = tmp_path / f"out{suffix}"
    write_volume_atomic(_random_volume("oblique"), output, metadata=MADE_WITH)
    assert json.loads((tmp_path / f"out{suffix}.json").read_text()) == MADE_WITH

    def cancel():
        raise Cancelled(130)

    # A cancel before the rename leaves the earlier pair as it was: the volume and its sidecar.
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(Cancelled):
        write_volume_atomic(_random_volume("oblique", seed=1), output, raise_if_cancelled=cancel,
                            metadata={**MADE_WITH, "vcm_seed": "8"})
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(Cancelled):
        write_volume_atomic(_random_volume("oblique"), fresh / f"out{suffix}", raise_if_cancelled=cancel,
                            metadata=MADE_WITH)
    assert list(fresh.iterdir()) == []


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_write_with_reference_keeps_geometry_bit_for_bit(tmp_path, geometry, file_format):
    reference_path = write_case(_random_volume(geometry), tmp_path, "reference", file_format)
    reference = read_volume(reference_path)
    result = sitk.Cast(reference * 2.0 + 1.0, sitk.sitkFloat32)
    suffix = ".nii.gz" if file_format == "nifti" else ".nrrd"
    output = write_volume_atomic(result, tmp_path / f"result{suffix}", reference=reference_path)
    written = read_volume(output)
    assert geometry_of(written) == geometry_of(reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(result))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([reference_path.name, output.name])


def test_ras_nrrd_reads_as_the_same_physical_volume(tmp_path):
    image = _random_volume("oblique")
    lps = read_volume(write_case(image, tmp_path, "lps", "nrrd-lps"))
    ras = read_volume(write_case(image, tmp_path, "ras", "nrrd-ras"))
    np.testing.assert_allclose(ras.GetOrigin(), lps.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(ras.GetDirection(), lps.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ras), sitk.GetArrayFromImage(lps))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.mha"
    old = _random_volume("axis_aligned", seed=1)
    write_volume_atomic(old, path)
    real_write = sitk.WriteImage

    def crash_after_writing(image, name, *args, **kwargs):
        real_write(image, name, *args, **kwargs)
        raise KeyboardInterrupt  # as if killed between writing and renaming

    monkeypatch.setattr(sitk, "WriteImage", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        write_volume_atomic(_random_volume("axis_aligned", seed=2), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out.mha"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(path)), sitk.GetArrayFromImage(old))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_short_write_is_caught_by_reading_back(tmp_path, monkeypatch, suffix):
    # ITK's NIfTI writer reports a short write (a full disk) only on stderr; its reader then
    # zero-fills the missing data. The read-back must see the file is incomplete.
    path = tmp_path / f"out{suffix}"
    old = _random_volume("oblique", seed=1)
    write_volume_atomic(old, path)
    real_write = sitk.WriteImage

    def short_write(image, name, *args, **kwargs):
        real_write(image, name, *args, **kwargs)
        os.truncate(name, os.path.getsize(name) * 3 // 4)

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    with pytest.raises(UserError, match=f"cannot write '.*out{re.escape(suffix)}': the file written"):
        write_volume_atomic(_random_volume("oblique", seed=2), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(path)), sitk.GetArrayFromImage(old))


def test_non_finite_results_are_never_written(tmp_path):
    image = _random_volume("oblique", seed=1)
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    values[0, 0, 0] = np.nan
    broken = sitk.GetImageFromArray(values)
    broken.CopyInformation(image)
    with pytest.raises(UserError, match="1 NaN or infinite voxels, so it was not written"):
        write_volume_atomic(broken, tmp_path / "out.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_an_existing_output(tmp_path):
    path = tmp_path / "out.nii.gz"
    write_volume_atomic(_random_volume("oblique", seed=1), path)
    new = _random_volume("oblique", seed=2)
    write_volume_atomic(new, path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(path)), sitk.GetArrayFromImage(new))


# --- bad inputs: one line, says what to do -------------------------------------------------


def _truncated_nrrd(tmp_path):
    path = tmp_path / "truncated.nrrd"
    nrrd.write(str(path), np.zeros((20, 20, 20), np.float32), {"encoding": "raw"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_gzip_nrrd(tmp_path):
    path = tmp_path / "truncated-gzip.nrrd"
    array = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    nrrd.write(str(path), array, {"encoding": "gzip"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbled_gzip_nrrd(tmp_path):
    path = tmp_path / "garbled.nrrd"
    nrrd.write(str(path), np.arange(8000, dtype=np.float32).reshape(20, 20, 20), {"encoding": "gzip"})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


def _huge_header(tmp_path):
    path = tmp_path / "huge.nhdr"
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\n"
                    "endian: little\nencoding: raw\ndata file: huge.raw\n")
    (tmp_path / "huge.raw").write_bytes(b"\x00" * 64)
    return path


def _text_file(tmp_path):
    path = tmp_path / "notes.nrrd"
    path.write_text("these are my notes, not an image\n")
    return path


def _image_2d(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(10, 10, sitk.sitkFloat32), str(path))
    return path


def _image_4d(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(path))
    return path


def _vector_image(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(path))
    return path


def _with_value(value):
    # NRRD: ITK's NIfTI reader already turns NaN and Inf into 0.
    def make(tmp_path):
        array = np.zeros((5, 5, 5), np.float32)
        array[2, 2, 2] = value
        path = tmp_path / "nonfinite.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        return path
    return make


@pytest.mark.parametrize(("make", "expected"), [
    (lambda tmp_path: tmp_path / "missing.nrrd", "does not exist"),
    (lambda tmp_path: tmp_path, "is a folder"),
    (_text_file, "not an image file"),
    (_truncated_nrrd, "truncated or corrupt"),
    (_truncated_gzip_nrrd, "truncated or corrupt"),
    (_garbled_gzip_nrrd, "truncated or corrupt"),
    (_huge_header, "crop or downsample"),
    (_image_2d, "2D image"),
    (_image_4d, "4D image"),
    (_vector_image, "3 values per voxel"),
    (_with_value(np.nan), "NaN or infinite"),
    (_with_value(np.inf), "NaN or infinite"),
])
def test_bad_volume_files_give_one_line_errors(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(UserError, match=expected) as raised:
        read_volume(path)
    assert "\n" not in str(raised.value)


def test_non_integer_labelmap_is_refused(tmp_path):
    path = tmp_path / "probabilities.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 4, 4), 0.5, np.float32)), str(path))
    with pytest.raises(UserError, match="non-integer values"):
        read_segmentation(path)


@pytest.mark.parametrize(("name", "expected"), [
    ("missing-folder/out.nrrd", "does not exist; create it"),
    ("out.png", "unsupported output format"),
    ("a-folder.nrrd", "it is a folder"),
])
def test_unwritable_outputs_are_refused_before_compute(tmp_path, name, expected):
    (tmp_path / "a-folder.nrrd").mkdir()
    with pytest.raises(UserError, match=expected):
        check_output_writable(tmp_path / name)


def test_output_in_a_folder_that_refuses_files_is_refused():
    with pytest.raises(UserError, match="choose a folder you can write to"):
        check_output_writable("/proc/result.nrrd")


def test_writable_output_check_leaves_nothing_behind(tmp_path):
    check_output_writable(tmp_path / "result.nii.gz")
    assert list(tmp_path.iterdir()) == []


# --- Slicer .seg.nrrd --------------------------------------------------------------------------


def test_slicer_seg_nrrd_segments_keep_names_and_overlaps(tmp_path):
    path, first, overlapping = write_slicer_segmentation(tmp_path)
    segmentation = read_segmentation(path)
    names = {value: segment.name for value, segment in segmentation.segments.items()}
    assert sorted(names.values()) == ["CSF", "Tumour", "grey matter"]
    # Slicer crops a .seg.nrrd to the segments' extent: put it back on the grid it was painted on.
    painted_on = sitk.Image([14, 12, 10], sitk.sitkInt32)
    painted_on.SetSpacing((0.8, 1.1, 2.5))
    painted_on.SetOrigin((-5.0, -6.0, 7.0))  # RAS (5, 6, 7) in LPS
    painted_on.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    expanded = sitk.GetArrayFromImage(
        sitk.Resample(segmentation.labelmap, painted_on, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    value_of = {name: value for value, name in names.items()}
    tumour = overlapping == 5
    assert np.array_equal(expanded == value_of["Tumour"], tumour)  # painted last, wins overlaps
    assert np.array_equal(expanded == value_of["CSF"], (first == 1) & ~tumour)
    assert np.array_equal(expanded == value_of["grey matter"], (first == 2) & ~tumour)
    assert segmentation.segments[value_of["Tumour"]].label_value == 1  # its value in layer 1
