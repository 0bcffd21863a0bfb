"""batch.py: manifest parsing, resumable runs, and a 2-rank `torchrun` split on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_worker import run_cli
from tiny_models import expected_provenance, make_tiny_model_folder, provenance_in_nrrd
from VCMSynthesisLib.batch import read_manifest
from VCMSynthesisLib.volumes import read_volume
from volume_cases import blob, geometry_of, make_image, write_case

SHAPE = (12, 12, 12)
LIB_PARENT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A tiny model and a manifest of 4 cases (relative paths, 2 geometries, 2 seeds each)."""
    folder = tmp_path_factory.mktemp("batch")
    model = make_tiny_model_folder(folder / "tiny", grid=(8, 8, 8))
    inputs = folder / "inputs"
    inputs.mkdir()
    rows = ["segmentation,modality:T2,seed,output"]
    for index, geometry in enumerate(("oblique", "anisotropic", "sheared", "axis_aligned")):
        labels = np.zeros(SHAPE, np.int16)
        labels[blob(SHAPE, (6, 6, 6), (4, 4, 4))] = 1 + index % 3
        write_case(make_image(labels, geometry), inputs, f"seg{index}", "nrrd-lps")
        t2 = np.random.default_rng(index).random(SHAPE).astype(np.float32)
        write_case(make_image(t2, geometry), inputs, f"t2_{index}", "nifti")
        rows.append(f"inputs/seg{index}.nrrd,inputs/t2_{index}.nii.gz,{index},results/case{index}.nrrd")
    (folder / "results").mkdir()
    manifest = folder / "cases.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return {"folder": folder, "model": model, "manifest": manifest}


def test_two_torchrun_ranks_split_the_cases_and_a_rerun_skips_them(batch):
    results = batch["folder"] / "results"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "VCMSynthesisLib", "batch", "--manifest", str(batch["manifest"]),
         "--model", str(batch["model"]),
         "--device", "cpu", "--steps", "2", "--progress", "json"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(LIB_PARENT), "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    done = {line["output"]: line["rank"] for line in lines if line["status"] == "done"}
    assert sorted(Path(output).name for output in done) == [f"case{i}.nrrd" for i in range(4)]
    assert len(lines) == 4  # each case written exactly once
    assert sorted(done.values()) == [0, 0, 1, 1]
    for case in read_manifest(batch["manifest"]):
        assert geometry_of(read_volume(case.output)) == geometry_of(read_volume(case.segmentation))
    written_at = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    assert sorted(written_at) == [f"case{i}.nrrd" for i in range(4)]

    # Resume: one output lost; a plain (single-process) rerun writes only that one.
    (results / "case2.nrrd").unlink()
    code, out, err = run_cli(["batch", "--manifest", batch["manifest"], "--model", batch["model"],
                              "--device", "cpu", "--steps", "2", "--progress", "json"])
    assert code == 0, err
    statuses = {Path(line["output"]).name: line["status"] for line in map(json.loads, out.splitlines())}
    assert statuses == {"case0.nrrd": "skipped", "case1.nrrd": "skipped", "case2.nrrd": "done",
                        "case3.nrrd": "skipped"}
    for name, mtime in written_at.items():
        if name != "case2.nrrd":
            assert (results / name).stat().st_mtime_ns == mtime


def test_a_failing_case_does_not_stop_the_others(batch, tmp_path):
    inputs = batch["folder"] / "inputs"
    manifest = tmp_path / "cases.csv"
    t2 = inputs / "t2_0.nii.gz"
    manifest.write_text(f"segmentation,modality:T2,output\n{inputs / 'missing.nrrd'},{t2},a.nrrd\n"
                        f"{inputs / 'seg0.nrrd'},{t2},b.nrrd\n")
    code, out, err = run_cli(["batch", "--manifest", manifest, "--model", batch["model"], "--device", "cpu",
                              "--steps", "1"])
    assert code == 1
    assert "row 2 failed" in out and "missing.nrrd' does not exist" in out and "row 3 done" in out
    assert "1 case(s) failed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.nrrd", "cases.csv"]
    assert sitk.GetArrayFromImage(read_volume(tmp_path / "b.nrrd")).std() > 0


def test_the_scheduler_applies_to_every_case_and_an_unknown_one_writes_nothing(batch, tmp_path):
    inputs = batch["folder"] / "inputs"
    manifest = tmp_path / "cases.csv"
    segmentation, t2 = inputs / "seg0.nrrd", inputs / "t2_0.nii.gz"
    manifest.write_text(f"segmentation,modality:T2,seed,output\n{segmentation},{t2},3,ddpm.nrrd\n")
    common = ["--model", batch["model"], "--device", "cpu", "--steps", "2"]
    code, out, err = run_cli(["batch", "--manifest", manifest, *common, "--scheduler", "euler"])
    assert code == 2 and err.count("\n") == 1 and "--scheduler: invalid choice: 'euler'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv"]

    code, _, err = run_cli(["batch", "--manifest", manifest, *common, "--scheduler", "ddpm"])
    assert code == 0, err
    for name, extra in (("single", ["--scheduler", "ddpm"]), ("default", [])):
        code, _, err = run_cli(["synthesize", "--segmentation", segmentation, "--modality", f"T2={t2}",
                                "--seed", "3", "--output", tmp_path / f"{name}.nrrd", *common, *extra])
        assert code == 0, err
    batch_ddpm, single, default = (sitk.GetArrayFromImage(read_volume(tmp_path / f"{name}.nrrd"))
                                   for name in ("ddpm", "single", "default"))
    np.testing.assert_array_equal(batch_ddpm, single)
    assert np.abs(batch_ddpm - default).max() > 1e-3
    assert provenance_in_nrrd(tmp_path / "ddpm.nrrd") == expected_provenance(batch["model"], seed=3, steps=2,
                                                                             scheduler="ddpm")


@pytest.mark.parametrize(("text", "expected"), [
    (None, "does not exist"),
    ("segmentation,result\nseg.nrrd,out.nrrd\n", r"needs 'output' .*\(unknown: \['result'\]\)"),
    ("segmentation,output,seed\nseg.nrrd,out.nrrd,seven\n", "row 2: seed must be a whole number"),
    ("segmentation,output,seed\nseg.nrrd,out.nrrd,46116860184273879040\n", "seed must be from 0 to 92233"),
    ("segmentation,output\nseg.nrrd,\n", "row 2: 'output' is empty"),
    ("segmentation,output\na.nrrd,out.nrrd\nb.nrrd,./out.nrrd\n", "more than once"),
    ("segmentation,output\n", "has no cases"),
    ("segmentation,modality:T2,output\n,,out.nrrd\n", "no segmentation and no modality"),
    ("segmentation,edit,output\nseg.nrrd,scan.nrrd,out.nrrd\n",
     "row 2: an edit needs its 'segmentation' .* one of 'original_segmentation' or 'region'"),
    ("segmentation,region,output\nseg.nrrd,mask.nrrd,out.nrrd\n", "row 2: .* belong to edits"),
])
def test_bad_manifests_give_one_line_errors(tmp_path, text, expected):
    manifest = tmp_path / "cases.csv"
    if text is not None:
        manifest.write_text(text)
    code, _, err = run_cli(["batch", "--manifest", manifest, "--model", "unused"])
    assert code == 1 and err.count("\n") == 1
    assert re.search(expected, err), err


def test_manifest_paths_are_relative_to_its_folder(tmp_path):
    manifest = tmp_path / "sub" / "cases.csv"
    manifest.parent.mkdir()
    manifest.write_text("output,modality:FLAIR,seed\nout/a.nii.gz,flair.nrrd,5\n")
    (case,) = read_manifest(manifest)
    assert case.output == tmp_path / "sub" / "out" / "a.nii.gz"
    assert case.modalities == {"FLAIR": tmp_path / "sub" / "flair.nrrd"}
    assert case.segmentation is None and case.seed == 5 and case.row == 2


def test_edit_rows_keep_the_scan_beyond_the_margin_and_synthesis_rows_still_run(batch, tmp_path):
    from VCMSynthesisLib.edit import DEFAULT_MARGIN_MM, distance_mm

    model = make_tiny_model_folder(tmp_path / "labels-only", modalities=None)
    original = np.zeros(SHAPE, np.int16)
    original[blob(SHAPE, (6, 6, 6), (5, 5, 5))] = 3
    edited = original.copy()
    edited[blob(SHAPE, (6, 6, 6), (2, 2, 2))] = 1
    noise = np.random.default_rng(0).normal(0, 5, SHAPE)
    scan = (np.where(original == 3, 800.0, 10.0) + noise).astype(np.float32)
    for name, array in (("scan", scan), ("original", original), ("edited", edited)):
        write_case(make_image(array, "axis_aligned"), tmp_path, name, "nrrd-lps")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("segmentation,edit,original_segmentation,output\n"
                        "edited.nrrd,scan.nrrd,original.nrrd,edited_scan.nrrd\n"
                        "edited.nrrd,,,synthesized.nrrd\n")
    code, out, err = run_cli(["batch", "--manifest", manifest, "--model", model, "--device", "cpu",
                              "--steps", "1", "--progress", "json"])
    assert code == 0, err
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["done", "done"]
    after = sitk.GetArrayFromImage(read_volume(tmp_path / "edited_scan.nrrd"))
    beyond = distance_mm(edited != original, (1.0, 1.0, 1.0)) >= DEFAULT_MARGIN_MM
    assert beyond.any()
    np.testing.assert_array_equal(after[beyond], scan[beyond])
    assert not np.array_equal(after, scan)
    assert not np.array_equal(sitk.GetArrayFromImage(read_volume(tmp_path / "synthesized.nrrd")), after)
