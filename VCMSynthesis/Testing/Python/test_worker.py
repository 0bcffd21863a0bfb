"""worker.py: `vcm-synthesis synthesize` / `models` end to end on a tiny real model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file, save_file
from tiny_models import TINY_STEPS, expected_provenance, make_tiny_model_folder, provenance_in_nrrd
from VCMSynthesisLib.cli import main
from VCMSynthesisLib.errors import Cancelled, UserError
from VCMSynthesisLib.memory import estimate_peak_bytes, plan_decode
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.runtime import SignalCancellation
from VCMSynthesisLib.volumes import read_segmentation, read_volume
from VCMSynthesisLib.worker import SynthesisRequest, synthesize
from volume_cases import blob, geometry_of, make_image, write_case, write_slicer_segmentation

SHAPE = (14, 16, 18)
LIB_PARENT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny model (labels 0-3, modality T2) and an oblique segmentation and T2 on disk."""
    folder = tmp_path_factory.mktemp("worker")
    model = make_tiny_model_folder(folder / "tiny")
    labels = np.zeros(SHAPE, np.int16)
    labels[blob(SHAPE, (7, 8, 9), (5, 6, 7))] = 1
    labels[blob(SHAPE, (7, 8, 9), (3, 3, 3))] = 2
    segmentation = write_case(make_image(labels, "oblique"), folder, "segmentation", "nrrd-lps")
    t2 = np.random.default_rng(0).random(SHAPE).astype(np.float32) * 300.0
    t2_path = write_case(make_image(t2, "oblique"), folder, "t2", "nifti")
    return {"folder": folder, "model": model, "segmentation": segmentation, "t2": t2_path}


def run_cli(arguments: list) -> tuple[int, str, str]:
    """`vcm-synthesis ARGUMENTS` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in arguments])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def synthesize_arguments(case, output, *extra):
    return ["synthesize", "--model", case["model"], "--segmentation", case["segmentation"],
            "--modality", f"T2={case['t2']}", "--output", output, "--device", "cpu", *extra]


def test_json_progress_and_exact_geometry(case, tmp_path):
    # In this process; test_sigterm_... reads the same lines from a real worker process.
    output = tmp_path / "synthetic.nrrd"
    code, out, err = run_cli(synthesize_arguments(case, output, "--progress", "json", "--steps", 3))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["step"] for line in lines[:-1]] == [1, 2, 3]
    assert all(line["total"] == 3 and line["elapsed_s"] >= 0 and line["eta_s"] >= 0 for line in lines[:-1])
    assert lines[-1]["result"] == str(output)
    timings = lines[-1]["timings"]
    assert timings["model_s"] > 0 and timings["sampling_s"] >= timings["model_s"] * 0.9
    written = read_volume(output)
    assert geometry_of(written) == geometry_of(read_volume(case["segmentation"]))
    values = sitk.GetArrayFromImage(written)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0 and values.std() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.nrrd"]


def test_text_mode_shows_a_bar_and_same_seed_gives_same_image(case, tmp_path):
    first, second, other = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz"
    for output, seed in ((first, 3), (second, 3), (other, 4)):
        code, out, err = run_cli(synthesize_arguments(case, output, "--seed", seed, "--steps", 2))
        assert code == 0, err
        assert f"wrote {output}" in out and "sampling" in err and "2/2" in err
    a, b, c = (sitk.GetArrayFromImage(read_volume(p)) for p in (first, second, other))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_results_say_how_they_were_made_in_the_nrrd_header_or_a_sidecar(case, tmp_path):
    nrrd_output, nifti_output = tmp_path / "made.nrrd", tmp_path / "made.nii.gz"
    for output in (nrrd_output, nifti_output):
        code, _, err = run_cli(synthesize_arguments(case, output, "--seed", 11, "--steps", 2))
        assert code == 0, err
    expected = expected_provenance(case["model"], seed=11, steps=2)
    assert provenance_in_nrrd(nrrd_output) == expected
    assert json.loads((tmp_path / "made.nii.gz.json").read_text()) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made.nii.gz", "made.nii.gz.json", "made.nrrd"]


def test_the_scheduler_flag_picks_the_sampler_and_the_result_records_it(case, tmp_path):
    """Without --scheduler the model's default sampler runs, bit for bit; --scheduler NAME gives the
    image a model whose default is NAME gives (same weights), and the provenance names it."""
    few_step = make_tiny_model_folder(tmp_path / "tiny-dpm", scheduler="dpmpp-2m")  # the weights of `case`'s
    runs = {"default": (few_step, []), "dpmpp-2m": (few_step, ["--scheduler", "dpmpp-2m"]),
            "ddim": (few_step, ["--scheduler", "ddim"]), "ddpm": (few_step, ["--scheduler", "ddpm"]),
            "ddim-model": (case["model"], [])}
    images = {}
    for name, (model, extra) in runs.items():
        output = tmp_path / f"{name}.nrrd"
        arguments = synthesize_arguments(case, output, "--seed", 5, *extra)
        arguments[arguments.index("--model") + 1] = model
        code, _, err = run_cli(arguments)
        assert code == 0, err
        images[name] = sitk.GetArrayFromImage(read_volume(output))
        scheduler = extra[1] if extra else None
        assert provenance_in_nrrd(output) == expected_provenance(model, seed=5, steps=TINY_STEPS,
                                                                 scheduler=scheduler)
    assert provenance_in_nrrd(tmp_path / "default.nrrd")["vcm_scheduler"] == "dpmpp-2m"
    np.testing.assert_array_equal(images["default"], images["dpmpp-2m"])
    np.testing.assert_array_equal(images["ddim"], images["ddim-model"])
    for one, other in (("default", "ddim"), ("default", "ddpm"), ("ddim", "ddpm")):
        assert np.abs(images[one] - images[other]).max() > 1e-3, (one, other)


def test_an_unknown_scheduler_in_a_request_is_one_line_and_writes_nothing(case, tmp_path):
    model = load_model_folder(case["model"])
    output = tmp_path / "out.nrrd"
    request = SynthesisRequest(segmentation=case["segmentation"], modalities={"T2": case["t2"]},
                               output=output, scheduler="euler")
    with pytest.raises(UserError, match=r"^unknown scheduler 'euler'; use one of ddim, ddpm, dpmpp-2m$"):
        synthesize(model, request)
    assert list(tmp_path.iterdir()) == []


def test_unguided_differs_from_guided(case, tmp_path):
    run_cli(synthesize_arguments(case, tmp_path / "guided.nrrd", "--steps", 2))
    code, _, err = run_cli(synthesize_arguments(case, tmp_path / "unguided.nrrd", "--steps", 2, "--unguided"))
    assert code == 0, err
    guided, unguided = (sitk.GetArrayFromImage(read_volume(tmp_path / f"{name}.nrrd"))
                        for name in ("guided", "unguided"))
    assert not np.array_equal(guided, unguided)


def test_strength_zero_is_the_unguided_sample(case, tmp_path):
    for name, extra in (("zero", ["--strength", "0"]), ("unguided", ["--unguided"])):
        code, _, err = run_cli(synthesize_arguments(case, tmp_path / f"{name}.nrrd", "--steps", 2, *extra))
        assert code == 0, err
    zero, unguided = (sitk.GetArrayFromImage(read_volume(tmp_path / f"{name}.nrrd"))
                      for name in ("zero", "unguided"))
    assert np.array_equal(zero, unguided)


def test_content_beyond_the_field_of_view_is_warned_about(case, tmp_path):
    # 46 mm along k, against the tiny model's 32 mm field of view.
    sitk.WriteImage(make_image(np.ones(SHAPE, np.int16), "anisotropic"), str(tmp_path / "big.nrrd"))
    t2 = make_image(np.random.default_rng(2).random(SHAPE).astype(np.float32), "anisotropic")
    sitk.WriteImage(t2, str(tmp_path / "t2.nrrd"))
    code, out, err = run_cli(["synthesize", "--model", case["model"], "--segmentation", tmp_path / "big.nrrd",
                              "--modality", f"T2={tmp_path / 't2.nrrd'}", "--output", tmp_path / "o.nrrd",
                              "--steps", 1, "--progress", "json"])
    assert code == 0, err
    warning = json.loads(out.splitlines()[0])["warning"]
    assert "beyond model 'tiny''s field of view (32 x 32 x 32 mm)" in warning


def test_slicer_seg_nrrd_in_nrrd_out_keeps_its_geometry(case, tmp_path):
    segmentation, _, _ = write_slicer_segmentation(tmp_path)
    labelmap = read_segmentation(segmentation).labelmap
    t2 = sitk.GetImageFromArray(np.random.default_rng(1).random(labelmap.GetSize()[::-1]).astype(np.float32))
    t2.CopyInformation(labelmap)
    sitk.WriteImage(t2, str(tmp_path / "t2.nrrd"))
    output = tmp_path / "synthetic.nrrd"
    code, _, err = run_cli(["synthesize", "--model", case["model"], "--segmentation", segmentation,
                            "--modality", f"T2={tmp_path / 't2.nrrd'}", "--output", output, "--steps", 1])
    assert code == 0, err
    assert geometry_of(read_volume(output)) == geometry_of(labelmap)


def test_several_samples_give_their_mean_and_the_per_voxel_spread(case, tmp_path):
    output, spread, single = tmp_path / "mean.nrrd", tmp_path / "std.nii.gz", tmp_path / "one.nrrd"
    code, out, err = run_cli(synthesize_arguments(case, output, "--steps", 2, "--samples", 3,
                                                  "--uncertainty", spread, "--progress", "json"))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    steps = [line["step"] for line in lines if "step" in line]
    assert steps == list(range(1, 7)) and lines[-1]["uncertainty"] == str(spread)
    assert run_cli(synthesize_arguments(case, single, "--steps", 2, "--samples", 1))[0] == 0
    reference = geometry_of(read_volume(case["segmentation"]))
    assert geometry_of(read_volume(output)) == reference
    std = sitk.GetArrayFromImage(read_volume(spread))
    assert std.min() >= 0 and std.max() > 0
    mean, one = (sitk.GetArrayFromImage(read_volume(path)) for path in (output, single))
    assert not np.array_equal(mean, one)  # seed 0 alone is not the mean of seeds 0, 1, 2


def test_live_preview_writes_the_predicted_image_every_n_steps(case, tmp_path):
    output, preview = tmp_path / "t1.nrrd", tmp_path / "preview.nrrd"
    code, out, err = run_cli(synthesize_arguments(case, output, "--steps", 5, "--preview", preview,
                                                  "--preview-every", 2, "--progress", "json"))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["step"] for line in lines if "preview" in line] == [2, 4]  # not the last: the result follows
    assert all(line["preview"] == str(preview) for line in lines if "preview" in line)
    assert lines[-1]["timings"]["preview_s"] > 0
    reference = geometry_of(read_volume(case["segmentation"]))
    assert geometry_of(read_volume(preview)) == reference
    values = sitk.GetArrayFromImage(read_volume(preview))
    assert np.isfinite(values).all() and 0.0 <= values.min() and values.max() <= 1.0
    assert not np.array_equal(values, sitk.GetArrayFromImage(read_volume(output)))  # step 4's guess


def test_a_preview_on_the_output_file_is_refused(case, tmp_path):
    output = tmp_path / "t1.nrrd"
    code, _, err = run_cli(synthesize_arguments(case, output, "--preview", output))
    assert code == 2 and "--preview names another output" in err
    assert list(tmp_path.iterdir()) == []


def test_an_uncertainty_map_needs_two_samples_and_nothing_is_written(case, tmp_path):
    arguments = synthesize_arguments(case, tmp_path / "o.nrrd", "--uncertainty", tmp_path / "s.nrrd")
    code, _, err = run_cli(arguments)
    assert code == 2 and "--uncertainty needs --samples 2 or more" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# --- bad inputs: one line, non-zero exit, nothing written ----------------------------------------


def _file(name, make):
    def build(case, tmp_path):
        path = tmp_path / name
        make(path)
        return path
    return build


def _labels(values):
    def make(path):
        array = np.zeros(SHAPE, np.int16)
        array[4:9, 4:9, 4:9] = values
        sitk.WriteImage(make_image(array, "oblique"), str(path))
    return make


def _nan_volume(path):
    array = np.zeros(SHAPE, np.float32)
    array[3, 3, 3] = np.nan
    sitk.WriteImage(make_image(array, "oblique"), str(path))


def _truncated(path):
    nrrd.write(str(path), np.zeros((20, 20, 20), np.float32), {"encoding": "raw"})
    path.write_bytes(path.read_bytes()[:4000])


def _far_away_t2(path):
    image = make_image(np.ones(SHAPE, np.float32), "oblique")
    image.SetOrigin((900.0, 0.0, 0.0))
    sitk.WriteImage(image, str(path))


def _model_without_tensor(case, tmp_path):
    folder = make_tiny_model_folder(tmp_path / "broken")
    tensors = load_file(folder / "adapter.safetensors")
    missing = sorted(tensors)[0]
    del tensors[missing]
    save_file(tensors, folder / "adapter.safetensors")
    return folder


SEGMENTATION, T2, MODEL, OUTPUT, EXTRA = "segmentation", "t2", "model", "output", "extra"


@pytest.mark.parametrize(("replace", "make", "code", "expected"), [
    (SEGMENTATION, lambda case, tmp_path: tmp_path / "nowhere.nrrd", 1, "does not exist"),
    (SEGMENTATION, _file("notes.nrrd", lambda p: p.write_text("not an image")), 1, "not an image file"),
    (SEGMENTATION, _file("truncated.nrrd", _truncated), 1, "truncated or corrupt"),
    (SEGMENTATION, _file("huge.nrrd", lambda p: p.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 90000 90000 90000\nendian: little\n"
        "encoding: raw\n\n0123456789")), 1, "crop or downsample"),
    (SEGMENTATION, _file("slice.nrrd", lambda p: sitk.WriteImage(sitk.Image(9, 9, sitk.sitkInt16), str(p))),
     1, "2D image"),
    (SEGMENTATION, _file("series.nii.gz", lambda p: sitk.WriteImage(
        sitk.Image([5, 5, 5, 2], sitk.sitkInt16), str(p))), 1, "4D image"),
    (SEGMENTATION, _file("vector.nrrd", lambda p: sitk.WriteImage(
        sitk.Image([5, 5, 5], sitk.sitkVectorFloat32, 2), str(p))), 1, "2 values per voxel"),
    (SEGMENTATION, _file("empty.nrrd", _labels(0)), 1, "is empty"),
    (SEGMENTATION, _file("label9.nrrd", _labels(9)), 1, "label value 9 .* 0 \\(background\\)"),
    (T2, _file("nan.nrrd", _nan_volume), 1, "NaN or infinite"),
    (T2, _file("far.nrrd", _far_away_t2), 1, "does not overlap"),
    (EXTRA, lambda case, tmp_path: ["--modality", f"FLAIR={case['t2']}"], 1, "takes no modality 'FLAIR'"),
    (T2, None, 1, "needs modality T2"),
    (MODEL, lambda case, tmp_path: "no-such-model", 1, "unknown model 'no-such-model'"),
    (MODEL, lambda case, tmp_path: tmp_path / "no-folder", 1, "does not exist"),
    (MODEL, _model_without_tensor, 1, "lacks tensor"),
    (MODEL, lambda case, tmp_path: make_tiny_model_folder(tmp_path / "sr", task="superres", labels=None),
     1, "super-resolution model; run `vcm-synthesis superres"),
    (OUTPUT, lambda case, tmp_path: tmp_path / "missing" / "out.nrrd", 1, "does not exist; create it"),
    (OUTPUT, lambda case, tmp_path: "/proc/out.nrrd", 1, "choose a folder you can write to"),
    (OUTPUT, lambda case, tmp_path: tmp_path / "out.png", 1, "unsupported output format"),
    (EXTRA, lambda case, tmp_path: ["--steps", "0"], 2, "--steps: must be at least 1"),
    (EXTRA, lambda case, tmp_path: ["--steps", "-3"], 2, "--steps: must be at least 1"),
    (EXTRA, lambda case, tmp_path: ["--device", "tpu"], 2, "invalid choice: 'tpu'"),
    (EXTRA, lambda case, tmp_path: ["--scheduler", "euler"], 2,
     "--scheduler: invalid choice: 'euler' \\(choose from '?ddim'?, '?ddpm'?, '?dpmpp-2m'?\\)"),
    (EXTRA, lambda case, tmp_path: ["--strength", "9"], 1, "strength must be between 0 and 4"),
    (EXTRA, lambda case, tmp_path: ["--strength", "nan"], 1, "strength must be between 0 and 4"),
    (EXTRA, lambda case, tmp_path: ["--modality", "T2"], 2, "must be NAME=FILE"),
])
def test_bad_inputs_give_one_line_and_write_nothing(case, tmp_path, replace, make, code, expected):
    output = tmp_path / "out.nrrd"
    arguments = {"model": case["model"], "segmentation": case["segmentation"], "t2": case["t2"],
                 "output": output}
    extra = []
    if replace == EXTRA:
        extra = make(case, tmp_path)
    elif make is None:
        del arguments[replace]
    else:
        arguments[replace] = make(case, tmp_path)
    command = ["synthesize", "--model", arguments["model"], "--segmentation", arguments["segmentation"],
               "--output", arguments["output"], "--device", "cpu", "--steps", 1]
    if "t2" in arguments:
        command += ["--modality", f"T2={arguments['t2']}"]
    exit_code, out, err = run_cli(command + extra)
    assert exit_code == code
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error:" if code == 1 else "vcm-synthesis synthesize: error:")
    assert re.search(expected, err), err
    assert not output.exists()
    assert not [p for p in Path(arguments["output"]).parent.glob(".*partial*")] if code == 1 else True


def test_cuda_without_a_gpu_is_refused(case, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(synthesize_arguments(case, tmp_path / "o.nrrd")[:-2] + ["--device", "cuda"])
    assert code == 1 and "sees no CUDA GPU; use --device cpu" in err


def test_errors_also_come_as_a_json_line(case, tmp_path):
    code, out, err = run_cli(["synthesize", "--model", "no-such-model", "--progress", "json",
                              "--segmentation", case["segmentation"], "--output", tmp_path / "o.nrrd"])
    assert code == 1
    assert "unknown model" in json.loads(out)["error"] and err.startswith("error:")


# --- cancellation ---------------------------------------------------------------------------------


def terminate(process: subprocess.Popen) -> float:
    """SIGTERM `process`; seconds until it exited (it is killed if it has not after 30 s)."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    finally:
        process.kill()
        process.wait()
    return time.monotonic() - sent


def assert_sigterm_stops_it(arguments: list, folder: Path) -> None:
    """`python -m VCMSynthesisLib ARGUMENTS --progress json`, sent SIGTERM at its first step, exits
    with 143 within 2 s, ends with the JSON cancel line and leaves `folder` empty."""
    process = subprocess.Popen(
        [sys.executable, "-m", "VCMSynthesisLib", *map(str, arguments), "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(LIB_PARENT)})
    while "step" not in json.loads(process.stdout.readline()):
        pass  # a warning (the 16 mm field of view crops some cases' content)
    stopped_after = terminate(process)
    lines = [json.loads(line) for line in process.stdout.read().splitlines()]
    assert process.returncode == 143
    assert stopped_after < 2.0, lines[-3:]
    assert lines[-1] == {"error": "cancelled; nothing was written"}
    assert list(folder.iterdir()) == []


def test_sigterm_stops_within_two_seconds_and_writes_nothing(case, tmp_path):
    output = tmp_path / "out" / "cancelled.nrrd"
    output.parent.mkdir()
    fast = make_tiny_model_folder(tmp_path / "fast", grid=(8, 8, 8))  # short steps: a loaded CI machine
    arguments = synthesize_arguments(case, output, "--steps", 1000)
    arguments[arguments.index("--model") + 1] = fast
    assert_sigterm_stops_it(arguments, output.parent)


WATCHDOG_SCRIPT = """
import numpy as np
from VCMSynthesisLib.runtime import SignalCancellation
matrix = np.random.default_rng(0).random((6000, 6000))
with SignalCancellation(lambda: print("farewell", flush=True)):
    print("ready", flush=True)
    matrix @ matrix.T  # one native call of several seconds: Python's handler waits for it
print("finished", flush=True)
"""


def test_watchdog_ends_a_process_stuck_in_a_native_call(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", WATCHDOG_SCRIPT], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(LIB_PARENT), "OMP_NUM_THREADS": "1",
                                    "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    stopped_after = terminate(process)
    assert process.returncode == 143
    assert process.stdout.read().split() == ["farewell"]
    assert stopped_after < 2.0


def test_sigint_during_sampling_raises_cancelled_and_writes_nothing(case, tmp_path):
    model = load_model_folder(case["model"])
    output = tmp_path / "cancelled.nrrd"
    request = SynthesisRequest(segmentation=case["segmentation"], modalities={"T2": case["t2"]},
                               output=output, steps=5)

    def interrupt_at_step_two(step, total):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with SignalCancellation() as cancellation, pytest.raises(Cancelled) as raised:
        synthesize(model, request, progress=interrupt_at_step_two, cancellation=cancellation)
    assert raised.value.exit_code == 130
    assert list(tmp_path.iterdir()) == []


# --- memory guard ---------------------------------------------------------------------------------


def test_memory_guard_refuses_with_advice(case, tmp_path):
    model = load_model_folder(case["model"])
    request = SynthesisRequest(segmentation=case["segmentation"], modalities={"T2": case["t2"]},
                               output=tmp_path / "o.nrrd", steps=1)
    with pytest.raises(UserError, match=r"needs about .* GiB on cpu .* only 0.0 GiB is available; "
                                        r"close other programs.* smaller grid"):
        synthesize(model, request, available_memory=10 * 2**20)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--device cpu"):
        plan_decode(model.config, model.folder, "cuda", available=2**20)
    assert plan_decode(model.config, model.folder, "cpu", available=2**40).slab_rows == 8  # thickest


def test_memory_estimate_grows_with_the_grid(tmp_path):
    small = make_tiny_model_folder(tmp_path / "small", grid=(16, 16, 16))
    large = make_tiny_model_folder(tmp_path / "large", grid=(32, 32, 32))
    estimates = [estimate_peak_bytes(load_model_folder(f).config, f, "cpu") for f in (small, large)]
    assert estimates[1] > estimates[0]


# --- models ---------------------------------------------------------------------------------------


def test_models_lists_shipped_and_user_models(tmp_path, monkeypatch):
    monkeypatch.setenv("VCM_SYNTHESIS_HOME", str(tmp_path))
    make_tiny_model_folder(tmp_path / "models" / "my-tiny")
    code, out, _ = run_cli(["models"])
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["name", "task", "conditions", "where"]
    mine = next(row for row in rows if row.startswith("my-tiny"))
    assert "synthesis" in mine and "label 1" in mine and str(tmp_path / "models" / "my-tiny") in mine
    code, out, _ = run_cli(["models", "--json"])
    entries = [json.loads(line) for line in out.splitlines()]
    assert {"name": "my-tiny", "source": "user", "available": True}.items() <= next(
        e for e in entries if e["name"] == "my-tiny").items()


def test_a_signal_after_the_commit_is_too_late_and_one_before_it_cancels():
    # Real signals to this process, in one SignalCancellation as the batch holds it.
    with SignalCancellation() as cancellation:
        with cancellation.deferred():
            cancellation.commit()  # the output is renamed into place after this
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run: it only recorded the signal
        with pytest.raises(Cancelled) as stopped:
            cancellation.next_job()  # the next case of a batch does not start
        assert stopped.value.exit_code == 143
    with pytest.raises(Cancelled), SignalCancellation() as cancellation, cancellation.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        cancellation.commit()  # during the write: cancelled before the rename
