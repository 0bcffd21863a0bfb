"""Segmentation node -> job folder -> real worker process (tiny MONAI model) -> result node.

Everything is real: slicer-core's scene and nodes, the `vcm-synthesis synthesize` worker started
as a child process in its own process group, its JSON-lines progress, Cancel by signal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import pytest
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
from tiny_models import make_tiny_model_folder, tiny_config, tiny_networks
from VCMSynthesisLib import jobs, scene
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_folder import save_model_folder

SEGMENT_NAMES = {1: "label 1", 2: "label 2", 3: "label 3"}  # tiny models name label k "label k"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny", modalities=("T2",))


def scene_case(geometry: str):
    mrml = new_scene()
    reference = add_volume(mrml, GEOMETRIES[geometry])
    segmentation = add_segmentation(mrml, reference, blob_labelmap(), SEGMENT_NAMES)
    return mrml, reference, segmentation


def write_job(tmp_path, tiny_model, segmentation, reference, steps: int, **options):
    table = scene.model_label_table(tiny_model)
    mapping = scene.default_label_mapping(scene.segment_names(segmentation), table)
    assert len(mapping) == 3
    return scene.write_synthesis_job(
        tmp_path / "job", segmentation, mapping, model=str(tiny_model), reference_volume_node=reference,
        modality_nodes={"T2": reference}, steps=steps, seed=3, device="cpu", **options,
    )


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_segmentation_node_to_result_node_with_the_reference_geometry(tmp_path, tiny_model, geometry):
    mrml, reference, segmentation = scene_case(geometry)
    job = write_job(tmp_path, tiny_model, segmentation, reference, steps=1)
    progress = []

    outcome = jobs.run_job(job, python=sys.executable, on_progress=progress.append)
    node = scene.apply_outcome(outcome, mrml, name="condition synthesized", next_to=segmentation)

    assert [(p.step, p.total) for p in progress] == [(1, 1)]
    # Only with 6 mm slices is the content (36 mm between centres) longer than the 32 mm model grid.
    assert bool(outcome.warnings) == (geometry == "anisotropic"), outcome.warnings
    assert all("field of view" in text for text in outcome.warnings)
    assert outcome.timings["total_s"] > 0
    assert node.GetScene() is mrml and node.GetName() == "condition synthesized"
    assert array_of(node).shape == SHAPE_KJI
    np.testing.assert_allclose(matrix_of(node), matrix_of(reference), rtol=0, atol=1e-9)
    assert np.isfinite(array_of(node)).all() and np.ptp(array_of(node)) > 0
    assert json.loads((job.folder / jobs.JOB_DESCRIPTION).read_text())["arguments"][0] == "synthesize"
    job.remove_data()  # the panel keeps only what "Show log" needs
    assert sorted(path.name for path in job.folder.iterdir()) == [jobs.JOB_DESCRIPTION, jobs.LOG_NAME]


def test_the_panels_sampler_choice_reaches_the_worker_and_the_result_node(tmp_path, tiny_model):
    """The panel passes the sampler only where it differs from the model's (`scene.changed_sampling`);
    the result node's provenance names the sampler that ran, and a changed one changes the image."""
    from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig

    config = ModelConfig.load(tiny_model / CONFIG_NAME)
    mrml, reference, segmentation = scene_case("oblique")
    images = {}
    for chosen in ("ddim", "dpmpp-2m"):
        sampling = scene.changed_sampling(config, steps=2, scheduler=chosen,
                                          strength=config.sampling_strength)
        assert sampling == {"steps": 2, "scheduler": None if chosen == config.sampling_scheduler else chosen,
                            "strength": None}
        job = write_job(tmp_path / chosen, tiny_model, segmentation, reference, **sampling)
        assert ("--scheduler" in job.arguments) == (chosen != config.sampling_scheduler)
        node = scene.apply_outcome(jobs.run_job(job, python=sys.executable), mrml, name=chosen,
                                   next_to=segmentation)
        assert node.GetAttribute("vcm_scheduler") == chosen and node.GetAttribute("vcm_steps") == "2"
        images[chosen] = array_of(node)
    assert np.abs(images["ddim"] - images["dpmpp-2m"]).max() > 1e-3


def test_superres_button_path_puts_an_isotropic_volume_next_to_the_input(tmp_path):
    config = dataclasses.replace(
        tiny_config(labels=None, modalities=("thick",), task="superres", name="tiny-superres"),
        metadata={"superres": {"thickness_mm": [3.0, 7.0]}},
    )
    model = save_model_folder(tmp_path / "tiny-superres", config, *tiny_networks(config))
    mrml = new_scene()
    directions = GEOMETRIES["oblique"][:3, :3] / 1.5
    thick_affine = np.eye(4)
    thick_affine[:3, :3] = directions @ np.diag([1.5, 1.5, 5.0])
    thick_affine[:3, 3] = (10.0, -20.0, 5.0)
    smooth = np.fromfunction(lambda k, j, i: np.sin(i / 3.0) + np.cos(j / 4.0) + k / 3.0, (6, 20, 22))
    thick = add_volume(mrml, thick_affine, (100.0 * smooth).astype(np.float32), name="thick T1")
    job = scene.write_superres_job(tmp_path / "job", thick, model=str(model), device="cpu", steps=1,
                                   scheduler="ddpm")

    node = scene.apply_outcome(jobs.run_job(job, python=sys.executable), mrml, name="thin T1", next_to=thick)

    result = matrix_of(node)
    spacing = np.linalg.norm(result[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, spacing[0], rtol=1e-6)  # isotropic
    np.testing.assert_allclose(result[:3, :3] / spacing, directions, atol=1e-6)  # same directions
    assert np.isfinite(array_of(node)).all()
    assert node.GetAttribute("vcm_scheduler") == "ddpm"  # the panel's choice, not the model's DDIM


def test_cancel_kills_the_worker_group_and_leaves_the_scene_unchanged(tmp_path, tiny_model):
    mrml, reference, segmentation = scene_case("oblique")
    output = add_volume(mrml, GEOMETRIES["anisotropic"], name="previous result")
    kept = array_of(output).copy()
    before = node_ids(mrml)
    job = write_job(tmp_path, tiny_model, segmentation, reference, steps=1000)
    run = jobs.WorkerRun(job, python=sys.executable)
    while not run.poll():  # sampling has started
        assert run.running, job.log_path.read_text()
        time.sleep(0.1)

    run.cancel()
    outcome = run.wait(timeout=30)

    assert outcome.status == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(run.pid, 0)
    assert scene.apply_outcome(outcome, mrml, output_node=output, name="x", next_to=segmentation) is None
    assert node_ids(mrml) == before
    np.testing.assert_array_equal(array_of(output), kept)
    assert not job.output.exists()


def test_worker_failure_is_one_line_with_the_log_and_the_scene_is_unchanged(tmp_path):
    mrml, reference, segmentation = scene_case("sheared")
    output = add_volume(mrml, GEOMETRIES["oblique"], name="previous result")
    kept_matrix = matrix_of(output)
    before = node_ids(mrml)
    job = scene.write_synthesis_job(
        tmp_path / "job", segmentation, {scene.segment_names(segmentation).popitem()[0]: 1},
        model="no-such-model", reference_volume_node=reference, steps=1,
    )

    outcome = jobs.WorkerRun(job, python=sys.executable).wait(timeout=120)

    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "no-such-model" in outcome.message and "\n" not in outcome.message
    with pytest.raises(UserError, match=r"unknown model .* \(worker log: .*worker\.log\)"):
        scene.apply_outcome(outcome, mrml, output_node=output, name="x", next_to=segmentation)
    assert node_ids(mrml) == before
    np.testing.assert_array_equal(matrix_of(output), kept_matrix)


def test_modality_only_jobs_for_translation_models(tmp_path):
    _, t2, _ = scene_case("anisotropic")
    job = scene.write_synthesis_job(tmp_path, None, {}, model="demo-t2-to-t1", modality_nodes={"T2": t2})
    assert "--segmentation" not in job.arguments
    exported = tmp_path / "modality-0.nrrd"
    assert job.arguments[job.arguments.index("--modality") + 1] == f"T2={exported}"
    np.testing.assert_allclose(matrix_of(scene.read_volume_file(exported)), matrix_of(t2), atol=1e-9)
    with pytest.raises(UserError, match="no condition given"):
        scene.write_synthesis_job(tmp_path, None, {}, model="demo")
    with pytest.raises(UserError, match="a reference geometry needs a segmentation"):
        scene.write_synthesis_job(
            tmp_path, None, {}, model="demo", reference_volume_node=t2, modality_nodes={"T2": t2}
        )


def test_a_worker_python_that_cannot_start_is_a_user_error(tmp_path):
    job = jobs.synthesis_job(tmp_path, model="demo", segmentation=tmp_path / "s.nrrd")
    with pytest.raises(UserError, match="cannot start the worker Python"):
        jobs.WorkerRun(job, python=str(tmp_path / "no-python"))
    with pytest.raises(UserError, match="does not run"):
        jobs.probe_worker_python(str(tmp_path / "no-python"))


def test_probe_reports_what_the_worker_python_has():
    environment = jobs.probe_worker_python(sys.executable)
    assert environment.missing == []
    assert environment.torch_version
    assert environment.summary().startswith("ready: torch")


def test_the_panels_requirements_are_the_packages_dependencies():
    """One list: what setuptools builds into the package's metadata is what the panel checks and installs."""
    from pathlib import Path

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    project = Path(jobs.__file__).resolve().parents[2] / "pyproject.toml"
    distribution = apply_configuration(Distribution(), str(project))
    assert distribution.install_requires == list(jobs.WORKER_REQUIREMENTS.values())
    assert {"torch", "monai", "nrrd", "SimpleITK"} <= set(jobs.WORKER_REQUIREMENTS)  # import names


def grow_segment(segmentation, reference, segment_index: int, mask) -> None:
    """Replace a segment's voxels, as painting in Segment Editor does."""
    import slicer
    from slicer_scenes import image_from_array, vtk_matrix

    image = slicer.vtkOrientedImageData()
    image.DeepCopy(image_from_array(mask.astype(np.uint8)))
    image.SetImageToWorldMatrix(vtk_matrix(matrix_of(reference)))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(segment_index)
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE)


def test_edit_path_regenerates_the_edit_and_keeps_the_rest_of_the_scan(tmp_path):
    from VCMSynthesisLib.edit import distance_mm
    from VCMSynthesisLib.volumes import read_volume

    model = make_tiny_model_folder(tmp_path / "tiny-labels", modalities=None)
    mrml = new_scene()
    values = (1000.0 * np.random.default_rng(3).random(SHAPE_KJI)).astype(np.float32)
    scan = add_volume(mrml, GEOMETRIES["oblique"], values, name="scan")
    segmentation = add_segmentation(mrml, scan, blob_labelmap(), SEGMENT_NAMES)
    output = add_volume(mrml, GEOMETRIES["oblique"], np.zeros(SHAPE_KJI, np.float32), name="edited scan")
    session = scene.EditSession(scan, segmentation)  # the panel's "Start editing"
    assert session.before.GetScene() is None
    assert scene.segment_names(session.before) == scene.segment_names(segmentation)
    grown = np.zeros(SHAPE_KJI, bool)
    grown[2:9, 3:12, 2:11] = True  # label 1's box, one voxel larger on three sides
    grow_segment(segmentation, scan, 0, grown)
    mapping = scene.default_label_mapping(scene.segment_names(segmentation), scene.model_label_table(model))
    nodes = node_ids(mrml)

    job = session.write_job(tmp_path / "job", mapping, model=str(model), margin_mm=2.0, steps=1, device="cpu",
                            scheduler="dpmpp-2m")
    assert job.arguments[0] == "edit"
    changed = (array_of(scene.read_volume_file(job.folder / "edited.nrrd"))
               != array_of(scene.read_volume_file(job.folder / "original.nrrd")))
    assert changed.any()
    node = scene.apply_outcome(jobs.run_job(job, python=sys.executable), mrml, output_node=output,
                               name="edited scan")

    assert node is output and node_ids(mrml) == nodes  # the chosen output volume, replaced
    assert node.GetAttribute("vcm_scheduler") == "dpmpp-2m"
    np.testing.assert_allclose(matrix_of(node), matrix_of(scan), rtol=0, atol=1e-9)
    beyond = distance_mm(changed, read_volume(job.folder / "scan.nrrd").GetSpacing()) >= 2.0
    np.testing.assert_array_equal(array_of(node)[beyond], values[beyond])
    assert not np.array_equal(array_of(node)[changed], values[changed])


def test_an_edit_session_needs_its_nodes(tmp_path):
    mrml, reference, segmentation = scene_case("oblique")
    with pytest.raises(UserError, match="pick the scan and its segmentation"):
        scene.EditSession(None, segmentation)
    session = scene.EditSession(reference, segmentation)
    mrml.RemoveNode(segmentation)
    with pytest.raises(UserError, match="was removed; start editing again"):
        session.write_job(tmp_path / "job", {}, model="demo")


def test_live_preview_shows_in_a_preview_node_that_goes_when_the_run_ends(tmp_path, tiny_model):
    mrml, reference, segmentation = scene_case("oblique")
    job = write_job(tmp_path, tiny_model, segmentation, reference, steps=3, preview_every=1)
    nodes = node_ids(mrml)
    run = jobs.WorkerRun(job, python=sys.executable)
    outcome = run.wait()
    assert outcome.status == "succeeded", outcome.message
    path, step = run.preview
    assert path == job.folder / jobs.PREVIEW_NAME and step == 2
    preview = scene.show_preview(path, mrml, name="condition synthesized")
    assert preview.GetName() == "condition synthesized (preview)" and node_ids(mrml) != nodes
    again = scene.show_preview(path, mrml, preview, name="condition synthesized")
    assert again is preview  # the next preview updates the same node
    np.testing.assert_allclose(matrix_of(preview), matrix_of(reference), rtol=0, atol=1e-9)
    scene.remove_preview(preview)
    assert node_ids(mrml) == nodes


def test_several_samples_bring_their_uncertainty_as_a_second_volume(tmp_path, tiny_model):
    mrml, reference, segmentation = scene_case("sheared")
    job = write_job(tmp_path, tiny_model, segmentation, reference, steps=1, samples=2)
    nodes = node_ids(mrml)
    outcome = jobs.run_job(job, python=sys.executable)
    assert outcome.uncertainty == job.folder / jobs.UNCERTAINTY_NAME
    node = scene.apply_outcome(outcome, mrml, name="condition synthesized", next_to=segmentation)
    added = [mrml.GetNodeByID(node_id) for node_id in node_ids(mrml) if node_id not in nodes]
    volumes = [n for n in added if n.IsA("vtkMRMLScalarVolumeNode")]
    assert [v.GetName() for v in volumes] == ["condition synthesized", "condition synthesized uncertainty"]
    assert volumes[0] is node
    spread = array_of(volumes[1])
    assert spread.min() >= 0 and spread.max() > 0
    np.testing.assert_allclose(matrix_of(volumes[1]), matrix_of(node), rtol=0, atol=1e-9)


def test_job_command_lines():
    folder = jobs.new_job_folder()
    try:
        job = jobs.synthesis_job(
            folder, model="demo", segmentation=folder / "s.nrrd", modalities={"T2": folder / "t2.nrrd"},
            seed=4,
        )
        assert job.arguments == [
            "synthesize", "--model", "demo", "--segmentation", str(folder / "s.nrrd"),
            "--modality", f"T2={folder / 't2.nrrd'}", "--output", str(folder / "result.nrrd"),
            "--device", "auto", "--seed", "4",
        ]
        job = jobs.superres_job(folder, input_path=folder / "thick.nrrd", spacing=1.0, device="cpu")
        assert job.arguments == [
            "superres", "--input", str(folder / "thick.nrrd"), "--output", str(folder / "result.nrrd"),
            "--device", "cpu", "--spacing", "1.0",
        ]
        job = jobs.edit_job(folder, model="demo", image=folder / "scan.nrrd", segmentation=folder / "e.nrrd",
                            original_segmentation=folder / "o.nrrd", margin_mm=4.0, seed=2, samples=3)
        assert job.arguments == [
            "edit", "--model", "demo", "--image", str(folder / "scan.nrrd"), "--segmentation",
            str(folder / "e.nrrd"), "--original-segmentation", str(folder / "o.nrrd"), "--output",
            str(folder / "result.nrrd"), "--device", "auto", "--margin-mm", "4.0", "--seed", "2",
            "--samples", "3", "--uncertainty", str(folder / "uncertainty.nrrd"),
        ]
    finally:
        os.rmdir(folder)
