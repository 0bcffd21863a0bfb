"""The panel's choices on the module's parameter node, saved with the scene and loaded back
(slicer-core's real MRML scene, storage nodes, `.mrb` bundles and `.mrml` files)."""

from __future__ import annotations

import numpy as np
import pytest
from slicer_scenes import (
    GEOMETRIES,
    add_parameter_node,
    add_segmentation,
    add_volume,
    array_of,
    blob_labelmap,
    new_scene,
    node_ids,
    parameter_node_of,
    save_and_reload,
)
from VCMSynthesisLib import scene
from VCMSynthesisLib.scene import NOT_USED

NAMES = {1: "grey matter", 2: "White Matter", 3: "lesion"}
TABLE = [{"value": 5, "name": "grey matter"}, {"value": 7, "name": "white matter"}]
ODD_NAME = "FLAIR: 3D; fat-sat"  # ':' and ';' separate roles and IDs in MRML's references


def by_name(segmentation) -> dict[str, str]:
    return {name: segment_id for segment_id, name in scene.segment_names(segmentation).items()}


def node_named(mrml, name: str):
    nodes = [mrml.GetNthNode(index) for index in range(mrml.GetNumberOfNodes())]
    found = [node for node in nodes if node.GetName() == name]
    assert len(found) == 1, name
    return found[0]


def shown_mapping(parameters, segmentation) -> dict[str, int]:
    """What the panel shows for `segmentation` (as `VCMSynthesisWidget.updateSegmentMapping` asks)."""
    return scene.panel_label_mapping(scene.segment_names(segmentation), TABLE,
                                     scene.segment_label_values(segmentation),
                                     scene.saved_label_mapping(parameters, segmentation))


@pytest.fixture
def panel_scene():
    mrml = new_scene()
    reference = add_volume(mrml, GEOMETRIES["oblique"])
    t2 = add_volume(mrml, GEOMETRIES["oblique"], name="T2 scan")
    flair = add_volume(mrml, GEOMETRIES["sheared"], np.ones((10, 14, 12), np.float32), name="FLAIR scan")
    segmentation = add_segmentation(mrml, reference, blob_labelmap(), NAMES)
    parameters = add_parameter_node(mrml)
    return mrml, parameters, segmentation, t2, flair


@pytest.mark.parametrize("kind", ["mrb", "mrml"])
def test_label_and_modality_choices_come_back_with_the_scene_under_new_node_ids(panel_scene, tmp_path, kind):
    mrml, parameters, segmentation, t2, flair = panel_scene
    ids = by_name(segmentation)
    # The user overrides the name match ("grey matter" left out) and maps "lesion" by hand.
    choices = {ids["grey matter"]: NOT_USED, ids["White Matter"]: 7, ids["lesion"]: 5}
    scene.save_label_mapping(parameters, segmentation, choices)
    scene.save_modality_volume(parameters, "T2", t2)
    scene.save_modality_volume(parameters, ODD_NAME, flair)
    scene.save_modality_volume(parameters, "PD", None)
    shown = scene.used_labels(shown_mapping(parameters, segmentation))
    exported = scene.export_segmentation(segmentation, shown, tmp_path / "before.nrrd")
    before_ids = {node.GetName(): node.GetID() for node in (segmentation, t2, flair)}

    reloaded = save_and_reload(mrml, tmp_path / "saved", kind)

    loaded_parameters = parameter_node_of(reloaded)
    loaded_segmentation = node_named(reloaded, "condition")
    loaded_t2, loaded_flair = node_named(reloaded, "T2 scan"), node_named(reloaded, "FLAIR scan")
    after_ids = {node.GetName(): node.GetID() for node in (loaded_segmentation, loaded_t2, loaded_flair)}
    assert not set(before_ids.values()) & set(after_ids.values())  # every node has a new ID
    assert shown_mapping(loaded_parameters, loaded_segmentation) == choices  # the (not used) row too
    assert scene.saved_modality_volumes(loaded_parameters, ["T2", ODD_NAME, "PD"]) == {
        "T2": loaded_t2, ODD_NAME: loaded_flair}
    # The reloaded choices export the same label condition, voxel for voxel.
    again = scene.export_segmentation(
        loaded_segmentation, scene.used_labels(shown_mapping(loaded_parameters, loaded_segmentation)),
        tmp_path / "after.nrrd")
    labelmaps = [array_of(scene.read_volume_file(path)) for path in (exported, again)]
    np.testing.assert_array_equal(labelmaps[0], labelmaps[1])
    assert set(np.unique(labelmaps[1])) == {0, 5, 7}
    assert np.count_nonzero(labelmaps[1] == 5) == np.count_nonzero(blob_labelmap() == 3)  # lesion -> 5


def test_without_saved_choices_the_panel_shows_name_matches_and_leaves_the_rest_unused(panel_scene):
    _, parameters, segmentation, _, _ = panel_scene
    ids = by_name(segmentation)
    assert shown_mapping(parameters, segmentation) == {
        ids["grey matter"]: 5, ids["White Matter"]: 7, ids["lesion"]: NOT_USED}


def test_choices_of_another_segmentation_or_of_labels_the_model_lacks_give_way_to_the_defaults(panel_scene):
    mrml, parameters, segmentation, t2, _ = panel_scene
    ids = by_name(segmentation)
    other = add_segmentation(mrml, t2, blob_labelmap(), {1: "a", 2: "b", 3: "c"}, name="other")
    scene.save_label_mapping(parameters, other, dict.fromkeys(scene.segment_names(other), 7))
    assert scene.saved_label_mapping(parameters, segmentation) == {}
    assert shown_mapping(parameters, segmentation)[ids["grey matter"]] == 5
    # A value from another model's table (9) is no choice for this one; NOT_USED always is.
    scene.save_label_mapping(parameters, segmentation, {ids["grey matter"]: 9, ids["White Matter"]: NOT_USED})
    assert shown_mapping(parameters, segmentation) == {
        ids["grey matter"]: 5, ids["White Matter"]: NOT_USED, ids["lesion"]: NOT_USED}


def test_a_hand_edited_parameter_or_a_removed_volume_leaves_no_stale_choice(panel_scene):
    mrml, parameters, segmentation, t2, _ = panel_scene
    scene.save_label_mapping(parameters, segmentation, {})
    parameters.SetParameter(scene.LABEL_CHOICES_PARAMETER, "{not json")
    assert scene.saved_label_mapping(parameters, segmentation) == {}
    scene.save_modality_volume(parameters, "T2", t2)
    mrml.RemoveNode(t2)
    assert t2.GetID() not in node_ids(mrml)
    assert scene.saved_modality_volumes(parameters, ["T2"]) == {}
