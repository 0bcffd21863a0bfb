"""Label maps (`--label-map`): FreeSurfer / SynthSeg aseg numbers -> a model's labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_worker import run_cli
from tiny_models import make_tiny_model_folder
from VCMSynthesisLib.checkpoints import REFERENCE_LABEL_NAMES, reference_model_config
from VCMSynthesisLib.conditions import label_values_to_table
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.label_maps import PRESETS_FOLDER, preset_suggestions, read_label_map
from VCMSynthesisLib.volumes import Segment, Segmentation, read_segmentation

# What each label SynthSeg writes (FreeSurferColorLUT numbers) must become, written out here
# independently of Resources/LabelMaps/aseg.json: 1 white matter, 2 cortical grey matter,
# 3 ventricles, 4 deep grey matter, 5 hippocampus, 6 amygdala, 7 CSF, 8 brainstem.
SYNTHSEG_TO_PAPER = {
    2: 1, 41: 1, 7: 1, 46: 1, 28: 1, 60: 1,
    3: 2, 42: 2, 8: 2, 47: 2,
    4: 3, 43: 3, 5: 3, 44: 3, 14: 3, 15: 3,
    10: 4, 49: 4, 11: 4, 50: 4, 12: 4, 51: 4, 13: 4, 52: 4, 26: 4, 58: 4,
    17: 5, 53: 5, 18: 6, 54: 6, 24: 7, 16: 8,
}
PAPER_LABELS = reference_model_config("brainldm-vcm-semantics").labels
SHAPE = (16, 16, 16)


def aseg_array(extra=()) -> np.ndarray:
    """A 16^3 [k, j, i] volume holding every SynthSeg label (and `extra` values) in runs of voxels."""
    values = [0, *SYNTHSEG_TO_PAPER, 1003, 2035, *extra]
    return np.resize(np.repeat(np.array(values, np.int32), 7), SHAPE)


def write_aseg(path: Path, array: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-16.0, -16.0, -16.0))
    sitk.WriteImage(image, str(path))
    return path


def relabelled(array: np.ndarray, table: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda value: table.get(int(value), 0), otypes=[np.int32])(array)


def test_the_aseg_preset_maps_every_synthseg_label_voxel_by_voxel(tmp_path):
    array = aseg_array()
    segmentation = read_segmentation(write_aseg(tmp_path / "aseg.nii.gz", array))
    mapped = label_values_to_table(segmentation, PAPER_LABELS, "paper", read_label_map("aseg"))
    parcels = {1003: 2, 2035: 2}  # SynthSeg --parc cortical parcels are cortex
    np.testing.assert_array_equal(mapped, relabelled(array, {**SYNTHSEG_TO_PAPER, **parcels}))
    assert set(np.unique(mapped)) == {0, *range(1, 9)}


def test_the_paper_model_names_its_labels_as_the_preset_targets():
    assert [label.name for label in PAPER_LABELS] == list(REFERENCE_LABEL_NAMES)
    rows = json.loads((PRESETS_FOLDER / "aseg.json").read_text())["map"]
    assert {row["label"] for row in rows} == set(REFERENCE_LABEL_NAMES)


def test_a_value_the_map_does_not_list_is_one_error_unless_it_is_background(tmp_path):
    array = aseg_array(extra=(80, 30))
    segmentation = read_segmentation(write_aseg(tmp_path / "aseg.nii.gz", array))
    with pytest.raises(UserError, match=r"label value\(s\) 30, 80 of .* not in label map 'aseg'; .* "
                                         r"--unmapped background") as error:
        label_values_to_table(segmentation, PAPER_LABELS, "paper", read_label_map("aseg"))
    assert "\n" not in str(error.value)
    mapped = label_values_to_table(segmentation, PAPER_LABELS, "paper", read_label_map("aseg", "background"))
    np.testing.assert_array_equal(mapped, relabelled(array, {**SYNTHSEG_TO_PAPER, 1003: 2, 2035: 2}))


def test_seg_nrrd_segments_match_by_their_freesurfer_names_not_their_numbers():
    """A Slicer segmentation of an aseg names its segments after FreeSurfer's colour table; the
    numbers in its labelmap are whatever Slicer gave them."""
    array = np.zeros(SHAPE, np.int32)
    array[:4], array[4:8], array[8:12], array[12:] = 1, 2, 3, 4
    labelmap = sitk.GetImageFromArray(array)
    segments = {1: Segment("Left-Hippocampus", 1), 2: Segment("right-amygdala", 2),
                3: Segment("Label_16", 16),
                4: Segment("lesion", 4)}
    segmentation = Segmentation(labelmap=labelmap, path=Path("case.seg.nrrd"), segments=segments)
    with pytest.raises(UserError, match=r"segment\(s\) lesion of 'case.seg.nrrd' match no name in label map"):
        label_values_to_table(segmentation, PAPER_LABELS, "paper", read_label_map("aseg"))
    mapped = label_values_to_table(segmentation, PAPER_LABELS, "paper", read_label_map("aseg", "background"))
    np.testing.assert_array_equal(mapped, relabelled(array, {1: 5, 2: 6, 3: 8, 4: 0}))


def write_map(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"label map '.*bad.json' is not JSON \(.* at line 1\); fix the file"),
    ({"map": [{"value": 2, "label": 1}, {"value": 2, "label": 3}]},
     r"value 2 is listed twice \(rows 1 and 2\)"),
    ({"map": []}, r'it needs a non-empty "map" list'),
    ({"map": [{"value": 2}]}, r'row 1 must be an object with "value", "label"'),
    ({"map": [{"value": "2", "label": 1}]}, r'row 1: "value" must be a label number'),
    ({"map": [{"value": 2, "label": 1.5}]}, r"row 1: \"label\" must be a model label's name or value"),
    ({"map": [{"value": 2, "label": 1}], "unmaped": "background"}, r"unknown field\(s\) unmaped"),
])
def test_a_bad_map_file_is_one_line(tmp_path, content, message):
    with pytest.raises(UserError, match=message) as error:
        read_label_map(write_map(tmp_path / "bad.json", content))
    assert "\n" not in str(error.value)


def test_an_unknown_preset_or_target_label_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"there is no label map 'asag'; give a preset \(aseg\) or a .json"):
        read_label_map("asag")
    typo = {"map": [{"value": 17, "label": "hipocampus"}]}
    hippocampus = read_label_map(write_map(tmp_path / "m.json", typo))
    with pytest.raises(UserError, match=r"maps 17 to label 'hipocampus', which model 'paper' does not have "
                                        r"\(its labels: 1 \(white matter\), .*8 \(brainstem\)\)"):
        hippocampus.resolve(PAPER_LABELS, "paper")
    with pytest.raises(UserError, match=r"maps 17 to label 9, which model 'paper' does not have"):
        read_label_map(write_map(tmp_path / "n.json", {"map": [{"value": 17, "label": 9}]})).resolve(
            PAPER_LABELS, "paper")


@pytest.fixture(scope="module")
def paper_like_model(tmp_path_factory):
    """A tiny model whose label table is the paper model's (values 1..8, its names)."""
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("models") / "paper-like",
                                    labels=tuple(range(1, 9)), modalities=None)
    config = json.loads((folder / "config.json").read_text())
    config["conditions"]["labels"]["table"] = [{"value": label.value, "name": label.name}
                                               for label in PAPER_LABELS]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def synthesize(model, segmentation, output, *extra):
    return run_cli(["synthesize", "--model", model, "--segmentation", segmentation, "--output", output,
                    "--device", "cpu", *extra])


def test_cli_label_map_gives_the_image_of_the_relabelled_segmentation(tmp_path, paper_like_model):
    array = aseg_array(extra=(80,))
    aseg = write_aseg(tmp_path / "aseg.nii.gz", array)
    by_hand = write_aseg(tmp_path / "by-hand.nii.gz",
                         relabelled(array, {**SYNTHSEG_TO_PAPER, 1003: 2, 2035: 2}))

    code, _, err = synthesize(paper_like_model, aseg, tmp_path / "mapped.nii.gz", "--label-map", "aseg")
    assert code == 1 and err.strip().count("\n") == 0
    assert "label value(s) 80 of" in err and not (tmp_path / "mapped.nii.gz").exists()

    code, _, err = synthesize(paper_like_model, aseg, tmp_path / "mapped.nii.gz", "--label-map", "aseg",
                              "--unmapped", "background")
    assert code == 0, err
    assert synthesize(paper_like_model, by_hand, tmp_path / "by-hand-out.nii.gz")[0] == 0
    mapped, expected = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
                        for name in ("mapped.nii.gz", "by-hand-out.nii.gz"))
    np.testing.assert_array_equal(mapped, expected)


def test_cli_refuses_bad_maps_before_loading_the_model(tmp_path, paper_like_model):
    aseg = write_aseg(tmp_path / "aseg.nii.gz", aseg_array())
    output = tmp_path / "out.nrrd"
    bad = write_map(tmp_path / "bad.json", "[1, 2")
    code, _, err = synthesize(paper_like_model, aseg, output, "--label-map", bad)
    assert (code, err.count("\n")) == (1, 1) and "is not JSON" in err
    code, _, err = synthesize(paper_like_model, aseg, output, "--unmapped", "background")
    assert code == 2 and "--unmapped goes with --label-map" in err
    demo_like = make_tiny_model_folder(tmp_path / "demo-like", modalities=None)  # labels "label 1".."label 3"
    code, _, err = synthesize(demo_like, aseg, output, "--label-map", "aseg")
    assert (code, err.count("\n")) == (1, 1) and "which model 'demo-like' does not have" in err
    assert not output.exists()


def test_edit_and_manifest_batch_take_the_label_map_too(tmp_path, paper_like_model):
    """`edit --label-map`: the edit of the aseg pair is the edit of the same pair relabelled by
    hand; `batch --label-map`: a manifest row gives the image `synthesize --label-map` gives."""
    table = {**SYNTHSEG_TO_PAPER, 1003: 2, 2035: 2}
    original = aseg_array()
    edited = original.copy()
    edited[4:9, 4:9, 4:9] = 17  # a hippocampus grown into its neighbours
    scan = sitk.GetImageFromArray((np.random.default_rng(3).random(SHAPE) * 400).astype(np.float32))
    scan.SetSpacing((2.0, 2.0, 2.0))
    scan.SetOrigin((-16.0, -16.0, -16.0))
    sitk.WriteImage(scan, str(tmp_path / "scan.nii.gz"))
    files = {name: write_aseg(tmp_path / f"{name}.nii.gz", array) for name, array in
             (("original", original), ("edited", edited), ("original-by-hand", relabelled(original, table)),
              ("edited-by-hand", relabelled(edited, table)))}

    def edit(output, edited_file, original_file, *extra):
        return run_cli(["edit", "--model", paper_like_model, "--image", tmp_path / "scan.nii.gz",
                        "--segmentation", edited_file, "--original-segmentation", original_file,
                        "--output", output, "--margin-mm", "2", "--device", "cpu", *extra])

    assert edit(tmp_path / "mapped.nii.gz", files["edited"], files["original"], "--label-map", "aseg")[0] == 0
    assert edit(tmp_path / "by-hand.nii.gz", files["edited-by-hand"], files["original-by-hand"])[0] == 0
    mapped, by_hand, kept = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
                             for name in ("mapped.nii.gz", "by-hand.nii.gz", "scan.nii.gz"))
    np.testing.assert_array_equal(mapped, by_hand)
    assert not np.array_equal(mapped, kept)

    manifest = tmp_path / "cases.csv"
    manifest.write_text("segmentation,output\noriginal.nii.gz,batch.nii.gz\n")
    code, _, err = run_cli(["batch", "--manifest", manifest, "--model", paper_like_model, "--device", "cpu",
                            "--label-map", "aseg"])
    assert code == 0, err
    single = synthesize(paper_like_model, files["original"], tmp_path / "single.nii.gz",
                        "--label-map", "aseg")
    assert single[0] == 0, single[2]
    batch, single = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
                     for name in ("batch.nii.gz", "single.nii.gz"))
    np.testing.assert_array_equal(batch, single)


def test_the_panel_suggests_labels_for_freesurfer_segment_names_only_for_a_model_the_preset_fits():
    names = {"S1": "Left-Hippocampus", "S2": "Right-Cerebral-Cortex", "S3": "Brain-Stem", "S4": "lesion",
             "S5": "left-thalamus-proper"}
    paper_table = [{"value": label.value, "name": label.name} for label in PAPER_LABELS]
    assert preset_suggestions(names, paper_table) == {"S1": 5, "S2": 2, "S3": 8, "S5": 4}
    demo_table = [{"value": 1, "name": "CSF"}, {"value": 2, "name": "grey matter"},
                  {"value": 3, "name": "white matter"}]
    assert preset_suggestions(names, demo_table) == {}


def test_describe_label_map_reports_volumes_pieces_sides_and_neighbours(tmp_path):
    """training/describe_label_map.py on a map whose answers are known: a 1-voxel shell (7)
    around a ball (2) holding a left and a right blob (4) of 27 voxels each."""
    import subprocess
    import sys

    training = Path(__file__).resolve().parents[3] / "training"
    sys.path.insert(0, str(training))
    import describe_label_map

    k, j, i = np.indices((20, 20, 20)) - 9.5
    radius = np.sqrt(i**2 + j**2 + k**2)
    array = np.where(radius < 9, 7, 0).astype(np.int16)
    array[radius < 8] = 2
    array[8:11, 8:11, 4:7] = 4
    array[8:11, 8:11, 13:16] = 4
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "map.nii.gz"))
    rows = {row["value"]: row for row in describe_label_map.describe(image)}

    assert sorted(rows) == [2, 4, 7]
    assert rows[4]["voxels"] == 54 and rows[4]["volume_ml"] == 0.11 and rows[4]["pieces"] == 2
    # SimpleITK's identity direction is LPS: i runs toward patient left, so RAS x = -i.
    xs = sorted(piece["centroid_ras_mm"][0] for piece in rows[4]["largest_pieces"])
    assert xs == [-14.0, -5.0] and rows[4]["left_right"] == [0.5, 0.5]
    assert rows[4]["x_from_midline_mm"] == 0.0 and rows[4]["midline_x_mm"] == -9.5
    assert rows[4]["neighbours"] == {2: 1.0}
    assert set(rows[7]["neighbours"]) == {0, 2} and rows[7]["neighbours"][0] > 0.4
    assert rows[7]["depth_mm"] < rows[2]["depth_mm"]  # a thin shell, a thick ball
    # RAS of voxel (i, j, k) here: (-i, -2 j, k); the first blob's 27 voxels and the ball's next to it.
    blob_box = [(-6.5, -3.5), (-20.0, -16.0), (8.0, 10.0)]
    assert describe_label_map.values_in_box(image, blob_box) == {4: 27}
    assert describe_label_map.values_in_box(image, [(-7.0, -3.5), *blob_box[1:]]) == {2: 9, 4: 27}

    completed = subprocess.run([sys.executable, training / "describe_label_map.py", tmp_path / "map.nii.gz",
                                "--box=-6.5:-3.5,-20:-16,8:10"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "label 4: 0.11 ml in 2 piece(s)" in completed.stdout
    assert completed.stdout.rstrip().endswith("box [(-6.5, -3.5), (-20.0, -16.0), (8.0, 10.0)]: 4: 27")
