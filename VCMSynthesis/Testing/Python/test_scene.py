"""Scene glue against slicer-core's real MRML scene, nodes, storage nodes and segmentation logic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from slicer_scenes import (
    GEOMETRIES,
    SHAPE_KJI,
    add_segmentation,
    add_volume,
    array_of,
    blob_labelmap,
    matrix_of,
    new_scene,
    node_ids,
)
from VCMSynthesisLib import scene
from VCMSynthesisLib.errors import UserError

NAMES = {1: "grey matter", 2: "White Matter", 3: "lesion"}
TABLE = [
    {"value": 0, "name": "background"},
    {"value": 5, "name": "grey matter"},
    {"value": 7, "name": "white matter"},
]


def ids_by_name(segmentation) -> dict[str, str]:
    return {name: segment_id for segment_id, name in scene.segment_names(segmentation).items()}


@pytest.fixture
def case():
    mrml = new_scene()
    reference = add_volume(mrml, GEOMETRIES["oblique"])
    segmentation = add_segmentation(mrml, reference, blob_labelmap(), NAMES)
    return mrml, reference, segmentation


def test_default_mapping_matches_names_in_any_case(case):
    _, _, segmentation = case
    ids = ids_by_name(segmentation)
    mapping = scene.default_label_mapping(scene.segment_names(segmentation), TABLE)
    assert mapping == {ids["grey matter"]: 5, ids["White Matter"]: 7}


def test_default_mapping_falls_back_to_label_values_of_imported_labelmaps():
    mrml = new_scene()
    reference = add_volume(mrml, GEOMETRIES["anisotropic"])
    # Slicer names the segments of an imported labelmap "Label_<value>" and keeps the values.
    names = {1: "Label_1", 2: "white matter", 3: "Label_3"}
    segmentation = add_segmentation(mrml, reference, blob_labelmap(), names)
    ids = ids_by_name(segmentation)
    table = [
        {"value": 0, "name": "background"},
        {"value": 1, "name": "CSF"},
        {"value": 2, "name": "grey matter"},
        {"value": 7, "name": "white matter"},
    ]
    values = scene.segment_label_values(segmentation)
    assert values == {ids["Label_1"]: 1, ids["white matter"]: 2, ids["Label_3"]: 3}

    mapping = scene.default_label_mapping(scene.segment_names(segmentation), table, values)

    # By name first ("white matter" -> 7, not its value 2), by value next, value 3 is no label.
    assert mapping == {ids["Label_1"]: 1, ids["white matter"]: 7}


def test_a_segment_named_like_no_label_is_left_out_unless_mapped_by_value():
    """A segment called "lesion" whose label value happens to be a model label is no such label."""
    mrml = new_scene()
    reference = add_volume(mrml, GEOMETRIES["anisotropic"])
    segmentation = add_segmentation(mrml, reference, blob_labelmap(), {1: "CSF", 2: "lesion", 3: "Label_3"})
    ids = ids_by_name(segmentation)
    table = [{"value": 1, "name": "CSF"}, {"value": 2, "name": "grey matter"}, {"value": 3, "name": "white"}]
    names, values = scene.segment_names(segmentation), scene.segment_label_values(segmentation)

    assert scene.default_label_mapping(names, table, values) == {ids["CSF"]: 1, ids["Label_3"]: 3}
    assert scene.default_label_mapping(names, table, values, by_value=True) == {
        ids["CSF"]: 1, ids["lesion"]: 2, ids["Label_3"]: 3}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_export_on_reference_keeps_geometry_and_maps_labels(tmp_path, geometry):
    mrml = new_scene()
    reference = add_volume(mrml, GEOMETRIES[geometry])
    segmentation = add_segmentation(mrml, reference, blob_labelmap(), NAMES)
    ids = ids_by_name(segmentation)
    before = node_ids(mrml)

    path = scene.export_segmentation(
        segmentation, {ids["grey matter"]: 5, ids["White Matter"]: 7}, tmp_path / "labels.nrrd", reference
    )

    assert node_ids(mrml) == before
    exported = scene.read_volume_file(path)
    np.testing.assert_allclose(matrix_of(exported), matrix_of(reference), rtol=0, atol=1e-9)
    labels = array_of(exported)
    assert labels.shape == SHAPE_KJI
    source = blob_labelmap()
    expected = np.select([source == 2, source == 1], [7, 5], 0)  # the lesion (3) is not mapped
    np.testing.assert_array_equal(labels, expected)
    # The worker reads it with SimpleITK: same grid there too (LPS = RAS with x, y negated).
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == SHAPE_KJI[::-1]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    np.testing.assert_allclose(lps_to_ras @ direction, matrix_of(reference)[:3, :3], atol=1e-9)
    origin = lps_to_ras @ np.array(image.GetOrigin())
    np.testing.assert_allclose(origin, matrix_of(reference)[:3, 3], atol=1e-9)


def test_later_segments_win_where_they_overlap(tmp_path, case):
    mrml, reference, segmentation = case
    ids = ids_by_name(segmentation)
    # Make "lesion" overlap the whole grey-matter box, then map both.
    outer = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(ids["grey matter"], outer)
    segmentation.GetSegmentation().GetSegment(ids["lesion"])  # exists
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        outer, segmentation, ids["lesion"], slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    path = scene.export_segmentation(
        segmentation, {ids["grey matter"]: 5, ids["lesion"]: 9}, tmp_path / "overlap.nrrd", reference
    )
    labels = array_of(scene.read_volume_file(path))
    assert set(np.unique(labels)) == {0, 9}


def test_seg_nrrd_without_reference_uses_its_full_reference_geometry(tmp_path, case):
    _, reference, segmentation = case
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "case.seg.nrrd"))
    assert storage.WriteData(segmentation)
    # Read into a fresh scene, as the batch script does: no reference volume there.
    fresh = new_scene()
    loaded = fresh.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(tmp_path / "case.seg.nrrd"))
    assert reader.ReadData(loaded)
    ids = ids_by_name(loaded)

    path = scene.export_segmentation(loaded, {ids["White Matter"]: 7}, tmp_path / "labels.nrrd")

    exported = scene.read_volume_file(path)
    np.testing.assert_allclose(matrix_of(exported), matrix_of(reference), atol=1e-9)
    np.testing.assert_array_equal(array_of(exported), np.where(blob_labelmap() == 2, 7, 0))


def test_export_refuses_inputs_it_cannot_honour(tmp_path, case):
    mrml, reference, segmentation = case
    ids = ids_by_name(segmentation)
    with pytest.raises(UserError, match="no segment is mapped"):
        scene.export_segmentation(segmentation, {}, tmp_path / "a.nrrd", reference)
    with pytest.raises(UserError, match="not in 'condition'"):
        scene.export_segmentation(segmentation, {"no-such-segment": 1}, tmp_path / "a.nrrd", reference)
    transform = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    reference.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(UserError, match="under a transform; harden"):
        scene.export_segmentation(segmentation, {ids["lesion"]: 1}, tmp_path / "a.nrrd", reference)
    assert not (tmp_path / "a.nrrd").exists()
    empty = mrml.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(UserError, match="has no image data"):
        scene.export_volume(empty, tmp_path / "b.nrrd")


def test_export_volume_round_trip(tmp_path, case):
    _, reference, _ = case
    path = scene.export_volume(reference, tmp_path / "t2.nrrd")
    again = scene.read_volume_file(path)
    np.testing.assert_array_equal(array_of(again), array_of(reference))
    np.testing.assert_allclose(matrix_of(again), matrix_of(reference), atol=1e-9)


def test_load_result_adds_a_node_next_to_the_input(tmp_path, case):
    mrml, reference, segmentation = case
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "study")
    hierarchy.CreateItem(study, segmentation)
    result = scene.export_volume(reference, tmp_path / "result.nrrd")

    node = scene.load_result(result, mrml, name="condition synthesized", next_to=segmentation)

    assert node.GetScene() is mrml and node.GetName() == "condition synthesized"
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    np.testing.assert_allclose(matrix_of(node), matrix_of(reference), atol=1e-9)
    np.testing.assert_array_equal(array_of(node), array_of(reference))
    assert node.GetDisplayNode() is not None
    assert not scene.show_in_slice_views(node)  # no layout manager without the application


def test_load_result_updates_an_existing_node_in_place(tmp_path, case):
    mrml, reference, segmentation = case
    other = GEOMETRIES["anisotropic"]
    output = add_volume(mrml, other, np.zeros((3, 4, 5), np.float32), name="previous result")
    result = scene.export_volume(reference, tmp_path / "result.nrrd")
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml)  # Slicer always has one
    before = node_ids(mrml)

    node = scene.load_result(result, mrml, output_node=output, next_to=segmentation)

    assert node is output and node_ids(mrml) == before
    assert output.GetName() == "previous result"
    np.testing.assert_allclose(matrix_of(output), matrix_of(reference), atol=1e-9)
    assert array_of(output).shape == SHAPE_KJI


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_results_carry_their_provenance_as_node_attributes(tmp_path, case, suffix):
    from VCMSynthesisLib import jobs
    from VCMSynthesisLib.volumes import read_volume, write_volumes_atomic

    mrml, reference, segmentation = case
    image = read_volume(scene.export_volume(reference, tmp_path / "exported.nrrd"))
    made_with = {"vcm_model": "tiny", "vcm_model_sha256": "ab" * 32, "vcm_seed": "5", "vcm_steps": "3",
                 "vcm_scheduler": "ddim", "vcm_strength": "1.0", "vcm_version": "0.1.0"}
    result, spread = tmp_path / f"result{suffix}", tmp_path / f"spread{suffix}"
    write_volumes_atomic([(image, spread, None), (image, result, None)], metadata=made_with)

    node = scene.apply_outcome(jobs.Outcome("succeeded", result=result, uncertainty=spread), mrml,
                               name="synthesized", next_to=segmentation)
    uncertainty = mrml.GetFirstNodeByName("synthesized uncertainty")
    for loaded in (node, uncertainty):
        assert {key: loaded.GetAttribute(key) for key in made_with} == made_with
    plain = scene.load_result(scene.export_volume(reference, tmp_path / "plain.nrrd"), mrml)
    assert plain.GetAttribute("vcm_seed") is None
    if suffix != ".nrrd":
        (tmp_path / f"result{suffix}.json").write_text("{truncated")
        before = node_ids(mrml)
        with pytest.raises(UserError, match="cannot read .*result.nii.gz.json'"):
            scene.load_result(result, mrml)
        assert node_ids(mrml) == before


def test_unreadable_result_leaves_the_scene_unchanged(tmp_path, case):
    mrml, _, segmentation = case
    output = add_volume(mrml, GEOMETRIES["sheared"], name="previous result")
    kept = array_of(output).copy()
    broken = tmp_path / "result.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n12")
    before = node_ids(mrml)
    with pytest.raises(UserError, match="cannot read the volume"):
        scene.load_result(broken, mrml, output_node=output, next_to=segmentation)
    with pytest.raises(UserError, match="cannot read the volume"):
        scene.load_result(tmp_path / "missing.nrrd", mrml, next_to=segmentation)
    assert node_ids(mrml) == before
    np.testing.assert_array_equal(array_of(output), kept)


def test_export_resamples_onto_another_reference_grid(tmp_path, case):
    mrml, reference, segmentation = case
    # A finer grid over the same field of view, axis-aligned: the segments are resampled onto it.
    other = np.eye(4)
    other[:3, :3] = np.diag([0.75, 0.75, 0.75])
    corners = np.array([[i, j, k, 1.0] for i in (0, 11) for j in (0, 13) for k in (0, 9)])
    ras = corners @ matrix_of(reference).T
    other[:3, 3] = ras[:, :3].min(axis=0)
    shape = tuple(int(np.ceil(extent / 0.75)) + 1 for extent in np.ptp(ras[:, :3], axis=0))[::-1]
    target = add_volume(mrml, other, np.zeros(shape, np.float32), name="finer grid")
    ids = ids_by_name(segmentation)

    path = scene.export_segmentation(segmentation, {ids["White Matter"]: 7}, tmp_path / "fine.nrrd", target)

    exported = scene.read_volume_file(path)
    np.testing.assert_allclose(matrix_of(exported), other, atol=1e-9)
    labels = array_of(exported)
    assert labels.shape == shape and set(np.unique(labels)) == {0, 7}
    # Same physical volume: voxel count scales with the voxel volume ratio (1.5^3 / 0.75^3 = 8).
    source_voxels = int((blob_labelmap() == 2).sum())
    assert 0.5 * 8 * source_voxels < (labels == 7).sum() < 1.5 * 8 * source_voxels


def test_the_panel_passes_only_sampling_settings_that_differ_from_the_models(tmp_path):
    from tiny_models import make_tiny_model_folder
    from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig

    config = ModelConfig.load(make_tiny_model_folder(tmp_path / "tiny") / CONFIG_NAME)
    defaults = {"steps": config.sampling_steps, "strength": config.sampling_strength}

    assert scene.changed_sampling(config, **defaults) == {"steps": None, "strength": None}
    changed = scene.changed_sampling(config, steps=defaults["steps"] + 7, strength=defaults["strength"])
    assert changed == {"steps": config.sampling_steps + 7, "strength": None}
    assert scene.changed_sampling(None, steps=5, strength=1.0) == {"steps": 5, "strength": 1.0}
    assert scene.changed_sampling(config, scheduler=config.sampling_scheduler) == {"scheduler": None}
    assert scene.changed_sampling(config, scheduler="dpmpp-2m") == {"scheduler": "dpmpp-2m"}
    summary = scene.sampling_summary(config)
    assert summary == f"Defaults: DDIM, {config.sampling_steps} steps, strength 1."
    few_step = dataclasses.replace(config, sampling_scheduler="dpmpp-2m", sampling_steps=6)
    assert scene.sampling_summary(few_step) == "Defaults: DPM-Solver++(2M), 6 steps, strength 1."
