"""`python VCMSynthesis/Resources/Scripts/VCMSynthesisBatch.py ...` run as a subprocess, as a researcher
runs it."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import slicer
from slicer_scenes import (
    GEOMETRIES,
    SHAPE_KJI,
    add_segmentation,
    add_volume,
    array_of,
    blob_labelmap,
    matrix_of,
)
from slicer_scenes import new_scene as new_mrml_scene
from tiny_models import make_tiny_model_folder
from VCMSynthesisLib import scene

SCRIPT = Path(__file__).resolve().parents[2] / "Resources" / "Scripts" / "VCMSynthesisBatch.py"


def run_batch(*arguments, temporary: Path, timeout: float = 300, cwd: Path | None = None
              ) -> subprocess.CompletedProcess:
    """The script in a subprocess (working folder `cwd`) whose job folders go under `temporary`."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, arguments)], capture_output=True, text=True, timeout=timeout,
        check=False, env={**os.environ, "TMPDIR": str(temporary)}, cwd=cwd,
    )


def load_batch_module():
    spec = importlib.util.spec_from_file_location("VCMSynthesisBatch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_seg_nrrd(path: Path, names: dict[int, str]):
    """A `.seg.nrrd` saved by slicer-core's storage node, drawn on a sheared reference."""
    mrml = new_mrml_scene()
    reference = add_volume(mrml, GEOMETRIES["sheared"])
    segmentation = add_segmentation(mrml, reference, blob_labelmap(), names)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    return reference


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny", modalities=None)


def test_seg_nrrd_to_a_volume_on_its_reference_geometry(tmp_path, tiny_model):
    reference = write_seg_nrrd(tmp_path / "case.seg.nrrd", {1: "label 1", 2: "Label 2", 3: "lesion"})
    output = tmp_path / "out" / "t1.nrrd"

    completed = run_batch(
        "--segmentation", tmp_path / "case.seg.nrrd", "--output", output, "--model", tiny_model,
        "--label", "label 1=1", "--label", "Label 2=2", "--label", "lesion=3",
        "--steps", "1", "--device", "cpu", temporary=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == str(output)
    assert "step 1/1" in completed.stderr
    result = scene.read_volume_file(output)
    # The .seg.nrrd stores a cropped labelmap; the result covers the full reference grid.
    assert array_of(result).shape == SHAPE_KJI
    np.testing.assert_allclose(matrix_of(result), matrix_of(reference), rtol=0, atol=1e-9)
    assert [path.name for path in output.parent.iterdir()] == ["t1.nrrd"]
    assert not list(tmp_path.glob("vcm-batch-*")), "job folders of a successful run are removed"


def test_relative_paths_are_the_callers_from_any_working_folder(tmp_path, tiny_model):
    """Every path given relative to the caller's folder (the worker runs in its job folder)."""
    caller = tmp_path / "elsewhere"
    (caller / "data").mkdir(parents=True)
    reference = write_seg_nrrd(caller / "data" / "case.seg.nrrd", {1: "label 1", 2: "Label 2", 3: "lesion"})
    scene.export_volume(reference, caller / "reference.nrrd")
    (caller / "models").mkdir()
    os.symlink(tiny_model, caller / "models" / "tiny")
    labels = ["--label", "label 1=1", "--label", "Label 2=2", "--label", "lesion=3"]

    single = run_batch("--segmentation", "data/case.seg.nrrd", "--reference", "reference.nrrd",
                       "--output", "results/t1.nrrd", "--model", "models/tiny", *labels, "--steps", "1",
                       "--device", "cpu", temporary=tmp_path, cwd=caller)
    folder = run_batch("--cases", "data", "--output-dir", "folder-results", "--model", "models/tiny",
                       *labels, "--steps", "1", "--device", "cpu", temporary=tmp_path, cwd=caller)

    assert single.returncode == 0, single.stderr
    assert single.stdout.strip().splitlines()[-1] == str(caller / "results" / "t1.nrrd")
    result = scene.read_volume_file(caller / "results" / "t1.nrrd")
    np.testing.assert_allclose(matrix_of(result), matrix_of(reference), rtol=0, atol=1e-6)
    assert folder.returncode == 0, folder.stderr
    assert (caller / "folder-results" / "case_synthesized.nrrd").is_file()
    assert not list(tmp_path.glob("vcm-batch-*")), "nothing left under the job folders"


def test_failed_cases_are_reported_in_one_line_each_and_the_rest_go_on(tmp_path):
    (tmp_path / "a.seg.nrrd").write_bytes(b"NRRD0004\ntype: short\n")  # damaged
    labelmap = tmp_path / "b.nrrd"
    mrml = new_mrml_scene()
    scene.export_volume(add_volume(mrml, GEOMETRIES["oblique"], blob_labelmap().astype(np.int16)), labelmap)
    table = tmp_path / "manifest.csv"  # the `vcm-synthesis batch` manifest format
    table.write_text(
        "segmentation,modality:T2,output\n"
        "a.seg.nrrd,,out/a.nrrd\n"
        "b.nrrd,missing-t2.nrrd,out/b.nrrd\n"
        "missing.seg.nrrd,,out/c.nrrd\n"
    )

    completed = run_batch("--cases", table, temporary=tmp_path)

    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, completed.stderr
    assert "case 1/3 (a.seg.nrrd):" in errors[0] and "header is corrupt" in errors[0]
    assert "case 2/3 (b.nrrd): the T2 volume" in errors[1] and "missing-t2.nrrd' does not exist" in errors[1]
    assert "missing.seg.nrrd' does not exist" in errors[2]
    assert errors[3] == "error: 3 of 3 cases failed (see above)"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_outputs_that_are_inputs_are_refused_and_never_skipped(tmp_path):
    labelmap = tmp_path / "b.nrrd"
    scene.export_volume(add_volume(new_mrml_scene(), GEOMETRIES["oblique"], blob_labelmap().astype(np.int16)),
                        labelmap)
    before = labelmap.read_bytes()
    table = tmp_path / "manifest.csv"
    table.write_text("segmentation,output\nb.nrrd,b.nrrd\nb.nrrd,manifest.csv\n")
    for arguments in (["--segmentation", labelmap, "--output", labelmap],
                      ["--superres", labelmap, "--output", tmp_path / "." / "b.nrrd"],
                      ["--cases", table, "--skip-existing"]):
        completed = run_batch(*arguments, temporary=tmp_path)
        errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
        assert completed.returncode == 1 and "Traceback" not in completed.stderr
        assert "is the same file as" in errors[0], completed.stderr
    assert "the output '" in errors[0] and "the segmentation b.nrrd" in errors[0]
    assert "is the same file as --cases" in errors[1]
    assert errors[2] == "error: 2 of 2 cases failed (see above)"
    assert labelmap.read_bytes() == before


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--seed", "-1"], 2, "--seed: must be from 0 to"),
        (["--steps", "0"], 2, "--steps: must be at least 1"),
        (["--scheduler", "euler", "--segmentation", "x.nrrd", "--output", "o.nrrd"], 2,
         "--scheduler: invalid choice: 'euler'"),
        (["--spacing", "nan"], 2, "--spacing: must be a positive number"),
        (["--segmentation", "x.seg.nrrd"], 2, "--output FILE is needed"),
        (["--cases", "."], 2, "--output-dir FOLDER is needed"),
        (["--segmentation", "missing.seg.nrrd", "--output", "o.nrrd"], 1, "does not exist; check the path"),
        (["--segmentation", "x.seg.nrrd", "--output", "o.nrrd", "--modality", "T2"], 2, "NAME=VALUE"),
        (["--output", "o.nrrd"], 2, "give --segmentation, --modality NAME=FILE"),
        (["--segmentation", "x.seg.nrrd", "--cases", "."], 2, "not allowed with argument"),
    ],
)
def test_command_line_mistakes_are_one_line_errors(tmp_path, arguments, code, message):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert completed.returncode == code
    assert message in completed.stderr and completed.stderr.count("\n") == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_the_scheduler_goes_to_every_job_and_the_result_records_it(tmp_path, tiny_model):
    """`--scheduler ddpm` gives the image `vcm-synthesis synthesize --scheduler ddpm` gives, not the
    model's default DDIM one; the provenance names it."""
    from test_worker import run_cli
    from tiny_models import expected_provenance

    labelmap = tmp_path / "labels.nrrd"
    scene.export_volume(add_volume(new_mrml_scene(), GEOMETRIES["oblique"], blob_labelmap().astype(np.int16)),
                        labelmap)
    common = ["--model", tiny_model, "--steps", "2", "--seed", "3", "--device", "cpu"]
    completed = run_batch("--segmentation", labelmap, "--output", tmp_path / "batch.nrrd", *common,
                          "--scheduler", "ddpm", temporary=tmp_path)
    assert completed.returncode == 0, completed.stderr
    for name, extra in (("cli-ddpm", ["--scheduler", "ddpm"]), ("cli-default", [])):
        code, _, err = run_cli(["synthesize", "--segmentation", labelmap,
                                "--output", tmp_path / f"{name}.nrrd", *common, *extra])
        assert code == 0, err
    batch, ddpm, default = (array_of(scene.read_volume_file(tmp_path / f"{name}.nrrd"))
                            for name in ("batch", "cli-ddpm", "cli-default"))
    # The batch script runs in its own process at the machine's thread count, the CLI here at one
    # thread (conftest): float rounding differs, by about 1e-6.
    np.testing.assert_allclose(batch, ddpm, rtol=0, atol=1e-5)
    assert np.abs(batch - default).max() > 1e-3
    assert scene.read_provenance(tmp_path / "batch.nrrd") == expected_provenance(tiny_model, seed=3, steps=2,
                                                                                 scheduler="ddpm")


def test_unmatched_segment_names_say_how_to_map_them(tmp_path, tiny_model):
    batch = load_batch_module()
    names = {"S1": "label 1", "S2": "tumour"}
    table = scene.model_label_table(tiny_model)
    with pytest.raises(batch.UserError, match=r"segment\(s\) tumour .* --label 'SEGMENT=VALUE'"):
        batch._label_mapping(names, {}, table, tmp_path / "c.seg.nrrd")
    assert batch._label_mapping(names, {"tumour": "3"}, table, tmp_path / "c.seg.nrrd") == {"S1": 1, "S2": 3}
    assert batch._label_mapping(names, {"tumour": "0"}, table, tmp_path / "c.seg.nrrd") == {"S1": 1}


def test_a_segment_matching_no_label_is_refused_unless_mapped_by_value(tmp_path, tiny_model):
    """A segment called "lesion" with value 3 is no "label 3" unless the user says so."""
    write_seg_nrrd(tmp_path / "case.seg.nrrd", {1: "label 1", 2: "Label_2", 3: "lesion"})
    common = ["--segmentation", tmp_path / "case.seg.nrrd", "--model", tiny_model, "--steps", "1",
              "--device", "cpu"]

    refused = run_batch(*common, "--output", tmp_path / "refused.nrrd", temporary=tmp_path)
    by_value = run_batch(*common, "--output", tmp_path / "by-value.nrrd", "--map-by-value",
                         temporary=tmp_path)

    assert refused.returncode == 1
    assert "segment(s) lesion of" in refused.stderr and "--map-by-value" in refused.stderr
    assert "mapped by their label value: Label_2=2\n" in refused.stderr  # Slicer's own name for value 2
    assert not (tmp_path / "refused.nrrd").exists()
    assert by_value.returncode == 0, by_value.stderr
    assert "mapped by their label value: Label_2=2, lesion=3" in by_value.stderr


def test_a_label_map_reads_freesurfer_segment_names_as_the_explicit_labels_do(tmp_path, tiny_model):
    """Segments named after FreeSurfer's colour table (as Slicer names an imported aseg) go
    through a label map file: the image is the one of the same mapping given with --label."""
    import json

    names = {1: "Left-Hippocampus", 2: "Right-Amygdala", 3: "Brain-Stem"}
    write_seg_nrrd(tmp_path / "aseg.seg.nrrd", names)
    label_map = tmp_path / "to-tiny.json"
    label_map.write_text(json.dumps({"map": [
        {"value": 17, "names": ["Left-Hippocampus"], "label": "label 1"},
        {"value": 54, "names": ["Right-Amygdala"], "label": 2},
        {"value": 16, "names": ["Brain-Stem"], "label": "label 3"}]}))
    common = ("--segmentation", tmp_path / "aseg.seg.nrrd", "--model", tiny_model, "--steps", "1",
              "--device", "cpu")

    mapped = run_batch(*common, "--output", tmp_path / "mapped.nrrd", "--label-map", label_map,
                       temporary=tmp_path)
    explicit = run_batch(*common, "--output", tmp_path / "explicit.nrrd", "--label", "Left-Hippocampus=1",
                         "--label", "Right-Amygdala=2", "--label", "Brain-Stem=3", temporary=tmp_path)

    assert mapped.returncode == 0, mapped.stderr
    assert explicit.returncode == 0, explicit.stderr
    np.testing.assert_array_equal(array_of(scene.read_volume_file(tmp_path / "mapped.nrrd")),
                                  array_of(scene.read_volume_file(tmp_path / "explicit.nrrd")))

    write_seg_nrrd(tmp_path / "lesion.seg.nrrd", {**names, 3: "lesion"})
    refused = run_batch("--segmentation", tmp_path / "lesion.seg.nrrd", "--output", tmp_path / "no.nrrd",
                        "--model", tiny_model, "--label-map", label_map, temporary=tmp_path)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "segment(s) lesion of" in refused.stderr and "--unmapped background" in refused.stderr
    both = run_batch(*common, "--output", tmp_path / "no.nrrd", "--label-map", "aseg", "--label", "a=1",
                     temporary=tmp_path)
    assert both.returncode == 2 and "leave out --label and --map-by-value" in both.stderr
    assert not (tmp_path / "no.nrrd").exists()


def test_edit_of_a_scan_from_two_seg_nrrd_files(tmp_path, tiny_model):
    from VCMSynthesisLib.edit import distance_mm
    from VCMSynthesisLib.volumes import read_volume

    mrml = new_mrml_scene()
    values = (500.0 * np.random.default_rng(1).random(SHAPE_KJI)).astype(np.float32)
    scan = add_volume(mrml, GEOMETRIES["sheared"], values, name="scan")
    scene.export_volume(scan, tmp_path / "scan.nrrd")
    grown = blob_labelmap()
    grown[2:9, 3:12, 2:11][grown[2:9, 3:12, 2:11] == 0] = 1  # label 1's box one voxel larger
    names = {1: "label 1", 2: "label 2", 3: "label 3"}
    for name, labelmap in (("original", blob_labelmap()), ("edited", grown)):
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(tmp_path / f"{name}.seg.nrrd"))
        assert storage.WriteData(add_segmentation(mrml, scan, labelmap, names, name=name))
    output = tmp_path / "out" / "edited_scan.nrrd"

    completed = run_batch(
        "--edit", tmp_path / "scan.nrrd", "--segmentation", tmp_path / "edited.seg.nrrd",
        "--original-segmentation", tmp_path / "original.seg.nrrd", "--output", output, "--margin-mm", "2",
        "--model", tiny_model, "--steps", "1", "--device", "cpu", temporary=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    result = scene.read_volume_file(output)
    np.testing.assert_allclose(matrix_of(result), matrix_of(scan), rtol=0, atol=1e-9)
    changed = grown != blob_labelmap()
    beyond = distance_mm(changed, read_volume(tmp_path / "scan.nrrd").GetSpacing()) >= 2.0
    assert beyond.any()
    np.testing.assert_array_equal(array_of(result)[beyond], values[beyond])
    assert not np.array_equal(array_of(result)[changed], values[changed])

    completed = run_batch("--edit", tmp_path / "scan.nrrd", "--segmentation", tmp_path / "edited.seg.nrrd",
                          "--output", tmp_path / "o.nrrd", temporary=tmp_path)
    assert completed.returncode == 2 and "one of --original-segmentation or --region" in completed.stderr


def test_a_folder_of_cases(tmp_path):
    batch = load_batch_module()
    for name in ("b.seg.nrrd", "a.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = batch.cases_from_folder(tmp_path, tmp_path / "out")
    assert [(case.segmentation.name, case.output.name) for case in cases] == [
        ("a.nii.gz", "a_synthesized.nrrd"),
        ("b.seg.nrrd", "b_synthesized.nrrd"),
    ]


@pytest.mark.slow
def test_ctrl_c_stops_the_worker_and_writes_nothing(tmp_path, tiny_model):
    write_seg_nrrd(tmp_path / "case.seg.nrrd", {1: "label 1", 2: "label 2", 3: "label 3"})
    output = tmp_path / "t1.nrrd"
    command = [
        sys.executable, str(SCRIPT), "--segmentation", str(tmp_path / "case.seg.nrrd"),
        "--output", str(output), "--model", str(tiny_model), "--steps", "1000", "--device", "cpu",
    ]
    batch = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)}
    )
    for line in batch.stderr:  # wait until sampling runs
        if "step 1/1000" in line:
            break
    batch.send_signal(signal.SIGINT)
    rest = batch.stderr.read()
    assert batch.wait(timeout=60) == 130
    assert "cancelled: nothing was written" in rest
    assert not output.exists()
    log = next(tmp_path.glob("vcm-batch-*/vcm-job-*/worker.log")).read_text()
    assert log.rstrip().splitlines()[-1] in ("exit code 143", "exit code -15")
