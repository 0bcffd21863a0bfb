"""conditions.py: one-hot labels, normalized modalities, the model grid and the way back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from tiny_models import tiny_config
from VCMSynthesisLib.conditions import (
    IntensityScaling,
    array_from_image,
    assemble_conditions,
    grid_direction,
)
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import ModelConfig
from VCMSynthesisLib.volumes import Segmentation, read_segmentation, read_volume, write_volume_atomic
from volume_cases import FORMATS, GEOMETRIES, blob, dice, geometry_of, make_image, write_case

SHAPE = (14, 18, 22)  # k, j, i


def _labelmap() -> np.ndarray:
    """Labels 1 and 2: two touching ellipsoids; label 3: a ball inside label 1."""
    labels = np.zeros(SHAPE, np.int16)
    labels[blob(SHAPE, (7, 9, 6), (5, 6, 5))] = 1
    labels[blob(SHAPE, (7, 9, 15), (5, 6, 5))] = 2
    labels[blob(SHAPE, (7, 9, 6), (2, 2, 2))] = 3
    return labels


def _config(**kwargs):
    # 48 voxels of 1 mm hold every test geometry's content (at most 46 mm across).
    return tiny_config(grid=(48, 48, 48), spacing=(1.0, 1.0, 1.0), **kwargs)


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_labels_round_trip_through_the_model_grid(tmp_path, geometry, file_format):
    labels = _labelmap()
    path = write_case(make_image(labels, geometry), tmp_path, "segmentation", file_format)
    segmentation = read_segmentation(path)
    conditions = assemble_conditions(_config(modalities=()), segmentation, {})

    assert conditions.channels.shape == (4, 48, 48, 48)
    np.testing.assert_array_equal(conditions.channels.sum(axis=0), 1.0)  # one-hot everywhere
    assert not conditions.cropped
    assert conditions.channels[3].sum() > 0  # the small inner ball (below 1 mm in places) survives
    for value in (1, 2):
        back = conditions.to_reference(conditions.channels[value], default_value=0.0)
        assert geometry_of(back) == geometry_of(segmentation.labelmap)
        assert dice(sitk.GetArrayFromImage(back) >= 0.5, labels == value) > 0.9

    # Written with the segmentation as reference, the result reads back on its exact geometry.
    result = conditions.to_reference(conditions.channels[1], default_value=0.0)
    suffix = ".nii.gz" if file_format == "nifti" else ".nrrd"
    written = read_volume(write_volume_atomic(result, tmp_path / f"result{suffix}", reference=path))
    assert geometry_of(written) == geometry_of(read_volume(path))


def test_grid_is_axis_aligned_in_the_model_orientation_and_centred_on_the_content():
    labels = np.zeros(SHAPE, np.int16)
    labels[2:5, 3:7, 15:20] = 1  # off-centre box, toward +i
    image = make_image(labels, "oblique")
    conditions = assemble_conditions(_config(labels=(0, 1), modalities=()),
                                     Segmentation(labelmap=sitk.Cast(image, sitk.sitkInt32), path="box"), {})
    grid = conditions.grid
    assert grid.GetDirection() == grid_direction("RAS") == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert grid.GetSize() == (48, 48, 48) and grid.GetSpacing() == (1.0, 1.0, 1.0)
    box_centre = image.TransformContinuousIndexToPhysicalPoint((17.0, 4.5, 3.0))
    grid_centre = grid.TransformContinuousIndexToPhysicalPoint((23.5, 23.5, 23.5))
    np.testing.assert_allclose(grid_centre, box_centre, atol=1e-9)


@pytest.mark.parametrize(("orientation", "right_of_left", "superior_above"), [
    ("RAS", True, True), ("LAS", False, True), ("LPI", False, False),
])
def test_channel_axes_follow_the_model_orientation(orientation, right_of_left, superior_above):
    labels = np.zeros(SHAPE, np.int16)  # LPS identity: i runs toward the patient's left
    labels[5:9, 7:11, 2:6] = 1  # patient's right
    labels[5:9, 7:11, 16:20] = 2  # patient's left
    labels[11:13, 7:11, 9:13] = 3  # superior
    data = _config(modalities=()).to_dict()
    data["grid"]["orientation"] = orientation
    config = ModelConfig.from_dict(data)
    conditions = assemble_conditions(config, _segmentation(labels), {})
    assert conditions.grid.GetDirection() == grid_direction(orientation)
    centroids = [np.argwhere(conditions.channels[value]).mean(axis=0) for value in (1, 2, 3)]
    assert (centroids[0][0] > centroids[1][0]) == right_of_left  # first array axis: R or L
    assert (centroids[2][2] > centroids[0][2]) == superior_above  # third array axis: S or I


def test_content_larger_than_the_grid_is_cropped_and_flagged():
    labels = np.ones(SHAPE, np.int16)
    image = make_image(labels, "axis_aligned")
    config = tiny_config(labels=(0, 1), modalities=(), grid=(8, 8, 8), spacing=(1.0, 1.0, 1.0))
    conditions = assemble_conditions(config, Segmentation(sitk.Cast(image, sitk.sitkInt32), "big"), {})
    assert conditions.cropped
    back = sitk.GetArrayFromImage(conditions.to_reference(conditions.channels[1], default_value=-1.0))
    assert (back == -1.0).any() and (back == 1.0).sum() == 8 ** 3


def _physical_points(image: sitk.Image) -> np.ndarray:
    """Physical point of every voxel, as an array [k, j, i, xyz]."""
    index = np.indices(image.GetSize()[::-1], dtype=np.float64)[::-1].reshape(3, -1)  # i, j, k rows
    direction = np.array(image.GetDirection()).reshape(3, 3)
    steps = np.array(image.GetSpacing())[:, None] * index
    points = np.array(image.GetOrigin())[:, None] + direction @ steps
    return points.T.reshape(*image.GetSize()[::-1], 3)


def test_modality_on_another_grid_is_normalized_and_lines_up():
    segmentation = _segmentation(_labelmap(), "oblique")
    centre = np.array(segmentation.labelmap.TransformContinuousIndexToPhysicalPoint((10.5, 8.5, 6.5)))
    # A T2 on another (sheared) grid around the same centre; its intensity is the S coordinate.
    t2 = make_image(np.zeros((16, 16, 16), np.float32), "sheared")
    half = np.array(t2.GetDirection()).reshape(3, 3) @ (np.array(t2.GetSpacing()) * 7.5)
    t2.SetOrigin(tuple(centre - half))
    t2_values = sitk.GetImageFromArray((100.0 + 3.0 * _physical_points(t2)[..., 2]).astype(np.float32))
    t2_values.CopyInformation(t2)
    conditions = assemble_conditions(_config(), segmentation, {"t2": t2_values})

    scaling = conditions.scalings["T2"]
    values = sitk.GetArrayFromImage(t2_values)
    assert scaling == IntensityScaling(*np.percentile(values, [1.0, 99.0]))
    np.testing.assert_allclose(scaling.restore(scaling.normalize(values)), values, rtol=1e-5)
    channel = sitk.GetArrayFromImage(sitk.GetImageFromArray(conditions.channels[4].transpose(2, 1, 0)))
    points = _physical_points(conditions.grid)
    inside = np.array([all(1 <= c <= 14 for c in t2.TransformPhysicalPointToContinuousIndex(p.tolist()))
                       for p in points.reshape(-1, 3)]).reshape(channel.shape)
    assert inside.sum() > 100
    expected = (100.0 + 3.0 * points[..., 2] - scaling.low) / (scaling.high - scaling.low)
    np.testing.assert_allclose(channel[inside], expected[inside], atol=1e-4)


def test_modality_only_model_uses_the_first_modality_as_reference():
    t2 = make_image(blob(SHAPE, (7, 9, 9), (5, 6, 7)).astype(np.float32) * 50.0, "anisotropic")
    conditions = assemble_conditions(_config(labels=None), None, {"T2": t2})
    assert conditions.channels.shape == (1, 48, 48, 48)
    assert geometry_of(conditions.reference) == geometry_of(t2)
    assert array_from_image(conditions.grid).shape == (48, 48, 48)


@pytest.mark.parametrize("geometry", ["oblique", "anisotropic"])
def test_background_outside_the_labels_is_exactly_the_models_where_it_has_one(geometry):
    """A skull-stripped model's haze and the model grid's edge never reach the reference."""
    labels = _labelmap()
    segmentation = Segmentation(labelmap=make_image(labels.astype(np.int32), geometry), path="labels.nrrd")
    config = _config(modalities=None)
    conditions = assemble_conditions(config, segmentation, {})
    haze = np.full(config.grid.size, 0.3, np.float32)  # a model output that is grey everywhere
    assert conditions.content is not None and conditions.content.sum() == (labels > 0).sum()

    plain = sitk.GetArrayFromImage(conditions.synthesized_to_reference(haze, config))
    assert plain[labels > 0] == pytest.approx(0.3, abs=1e-4)  # no background value: untouched
    cleaned_config = replace(config, intensity_background=0.0)
    cleaned = sitk.GetArrayFromImage(conditions.synthesized_to_reference(haze, cleaned_config))
    far = ndimage.distance_transform_edt(labels == 0) > 3  # voxels, not mm: the edge is about a voxel
    assert (cleaned[far] == 0.0).all()  # exactly the background value away from the labels
    assert cleaned[labels > 0] == pytest.approx(0.3, abs=0.02)  # the labelled voxels keep the image
    assert geometry_of(conditions.synthesized_to_reference(haze, cleaned_config)) == geometry_of(
        segmentation.labelmap)


def test_seg_nrrd_segments_match_the_table_by_name_then_value():
    array = np.zeros(SHAPE, np.int32)
    array[2:6, 2:6, 2:6] = 1
    array[8:12, 8:12, 8:12] = 2
    labelmap = sitk.Cast(make_image(array, "axis_aligned"), sitk.sitkInt32)
    from VCMSynthesisLib.volumes import Segment

    segments = {1: Segment("LABEL 3", label_value=1), 2: Segment("Segment_2", label_value=2)}
    segmentation = Segmentation(labelmap, "s.seg.nrrd", segments)
    conditions = assemble_conditions(_config(modalities=()), segmentation, {})
    volumes = conditions.channels.sum(axis=(1, 2, 3))
    assert volumes[1] == 0 and volumes[2] > 0 and volumes[3] > 0  # "LABEL 3" -> 3 by name; 2 by value


# --- bad inputs ----------------------------------------------------------------------------------


def _segmentation(array, geometry="axis_aligned"):
    return Segmentation(sitk.Cast(make_image(array, geometry), sitk.sitkInt32), "seg.nrrd")


def _t2(geometry="axis_aligned", offset=(0.0, 0.0, 0.0)):
    image = make_image(np.random.default_rng(0).random(SHAPE).astype(np.float32), geometry)
    image.SetOrigin(tuple(np.add(image.GetOrigin(), offset)))
    return image


@pytest.mark.parametrize(("segmentation", "modalities", "expected"), [
    (_segmentation(np.zeros(SHAPE, np.int16)), {"T2": _t2()}, "is empty"),
    (_segmentation(np.where(_labelmap() == 3, 7, _labelmap())), {"T2": _t2()},
     r"label value 7 .* its values: 0 \(background\), 1 \(label 1\), 2 \(label 2\), 3 \(label 3\)"),
    (_segmentation(_labelmap()), {}, "needs modality T2; give --modality T2=FILE"),
    (_segmentation(_labelmap()), {"T2": _t2(), "FLAIR": _t2()}, "takes no modality 'FLAIR'"),
    (_segmentation(_labelmap()), {"T2": _t2(offset=(500.0, 0.0, 0.0))}, "does not overlap"),
    (_segmentation(_labelmap()), {"T2": make_image(np.full(SHAPE, 4.0, np.float32), "axis_aligned")},
     "cannot be normalized"),
    (None, {"T2": _t2()}, "needs a segmentation"),
])
def test_bad_conditions_give_one_line_errors(segmentation, modalities, expected):
    with pytest.raises(UserError, match=expected) as raised:
        assemble_conditions(_config(), segmentation, modalities)
    assert "\n" not in str(raised.value)


def test_segmentation_for_a_model_without_labels_is_refused():
    with pytest.raises(UserError, match="takes no segmentation"):
        assemble_conditions(_config(labels=None), _segmentation(_labelmap()), {"T2": _t2()})


def test_grid_snaps_onto_reference_voxels_when_spacings_match():
    labels = _labelmap()
    segmentation = _segmentation(labels, "axis_aligned")  # 1 mm, like the model grid
    conditions = assemble_conditions(_config(modalities=()), segmentation, {})
    for value in (1, 2, 3):
        back = conditions.to_reference(conditions.channels[value], default_value=0.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels == value)
