"""Faults a hostile user (or a bad day) causes, through the command line: nothing lost, nothing
half-written, never a traceback.

Full disks are real (a small tmpfs, mounted here when the test runs as root; skipped where
mounting is not allowed), signals are real (sent to a worker process while it writes its output,
found by its partial file appearing), broken files and folders are real files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file, save_file
from test_worker import run_cli
from tiny_models import make_tiny_model_folder, tiny_config, tiny_networks
from VCMSynthesisLib import registry
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_folder import load_model_folder, save_model_folder
from VCMSynthesisLib.volumes import read_volume
from volume_cases import blob, make_image, write_case

LIB_PARENT = Path(__file__).resolve().parents[2]
SHAPE = (14, 16, 18)


def assert_one_line_error(code: int, err: str, expected: str, exit_code: int = 1) -> None:
    lines = [line for line in err.splitlines() if not line.startswith("sampling:")]  # tqdm's bar
    assert code == exit_code, err
    assert "Traceback" not in err and 1 <= len(lines) <= 2, err
    assert expected in lines[-1], err


def partial_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".previous-" in p.name)


def cli_environment(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(LIB_PARENT), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny labels-only model and a segmentation (oblique NRRD)."""
    folder = tmp_path_factory.mktemp("faults")
    model = make_tiny_model_folder(folder / "tiny", modalities=None)
    labels = np.zeros(SHAPE, np.int16)
    labels[blob(SHAPE, (7, 8, 9), (5, 6, 7))] = 1
    labels[blob(SHAPE, (7, 8, 9), (3, 3, 3))] = 2
    segmentation = write_case(make_image(labels, "oblique"), folder, "segmentation", "nrrd-lps")
    return {"folder": folder, "model": model, "segmentation": segmentation}


def synthesize(case, output, *extra, segmentation=None, model=None):
    segmentation = segmentation or case["segmentation"]
    return ["synthesize", "--model", model or case["model"], "--segmentation", segmentation,
            "--output", output, "--device", "cpu", *extra]


# --- full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (root only), unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here, so no small disk to fill")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    """Fills the disk until only about `leave_bytes` are free (also `bench/bench_faults.py`'s)."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - leave_bytes))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_output(case, small_disk, suffix):
    output = small_disk / f"result{suffix}"
    code, _, err = run_cli(synthesize(case, output, "--seed", 1))
    assert code == 0, err
    previous = output.read_bytes()
    fill(small_disk, leave_bytes=8192)  # the output (about 13-16 kB) starts, then runs out of room
    code, _, err = run_cli(synthesize(case, output, "--seed", 2))
    assert_one_line_error(code, err, f"cannot write '{output}'")
    assert "left as it was" in err or "nothing was replaced" in err
    assert output.read_bytes() == previous
    assert partial_files(small_disk) == []


def test_a_full_disk_writes_nothing_when_there_was_no_output(case, small_disk):
    fill(small_disk, leave_bytes=8192)
    output = small_disk / "result.nii.gz"
    code, _, err = run_cli(synthesize(case, output))
    assert_one_line_error(code, err, f"cannot write '{output}'")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_model_folder_on_a_full_disk_keeps_the_previous_one(small_disk):
    folder = make_tiny_model_folder(small_disk / "model", seed=1, grid=(8, 8, 8))
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    fill(small_disk, leave_bytes=40_000)  # config and a weights file fit, not all three
    config = tiny_config(name="model", grid=(8, 8, 8))
    with pytest.raises(UserError, match="cannot write .*model"):
        save_model_folder(folder, config, *tiny_networks(config, seed=2))
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert partial_files(small_disk) == []
    load_model_folder(folder)


# --- signals during the write ---------------------------------------------------------------


@pytest.fixture(scope="module")
def large_case(tmp_path_factory):
    """A 200^3 segmentation: the output takes about a second to write, long enough to signal."""
    folder = tmp_path_factory.mktemp("large")
    shape = (200, 200, 200)
    labels = np.zeros(shape, np.int16)
    labels[blob(shape, (100, 100, 100), (60, 60, 60))] = 1
    image = make_image(labels, "axis_aligned")
    image.SetSpacing((0.2, 0.2, 0.2))
    return write_case(image, folder, "large", "nrrd-lps")


@pytest.mark.parametrize(("signum", "code", "suffix"), [
    (signal.SIGTERM, 143, ".nrrd"),
    pytest.param(signal.SIGINT, 130, ".nii.gz", marks=pytest.mark.slow),
])
def test_a_signal_during_the_write_cancels_it_and_keeps_the_previous_output(case, large_case, tmp_path,
                                                                             signum, code, suffix):
    output = tmp_path / f"result{suffix}"
    previous = b"the previous output"
    output.write_bytes(previous)
    process = subprocess.Popen(
        [sys.executable, "-m", "VCMSynthesisLib",
         *map(str, synthesize(case, output, "--progress", "json", segmentation=large_case))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_environment())
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".result.partial-{process.pid}{suffix}")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.002)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert json.loads(out.splitlines()[-1]) == {"error": "cancelled; nothing was written"}
    assert "Traceback" not in err and err.strip() == "cancelled: nothing was written"
    assert output.read_bytes() == previous
    assert partial_files(tmp_path) == []


def test_partial_files_of_dead_processes_are_removed_by_the_next_run(case, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead, alive = int(finished.stdout), os.getppid()  # pytest's parent outlives the test
    (tmp_path / f".result.partial-{dead}.nrrd").write_bytes(b"half a file")
    (tmp_path / f".model.partial-{dead}").mkdir()
    (tmp_path / f".result.partial-{alive}.nrrd").write_bytes(b"another process is writing this")
    code, _, err = run_cli(synthesize(case, tmp_path / "result.nrrd"))
    assert code == 0, err
    assert partial_files(tmp_path) == [f".result.partial-{alive}.nrrd"]


def test_a_model_folder_whose_replacement_was_killed_is_put_back(case, tmp_path, monkeypatch):
    # Killed between moving the old folder aside and renaming the new one in: only
    # `.mine.previous-PID` is left, and the next listing puts it back.
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    shutil.copytree(case["model"], models / f".mine.previous-{int(finished.stdout)}")
    (models / f".other.partial-{int(finished.stdout)}").mkdir()
    monkeypatch.setenv(registry.HOME_VARIABLE, str(tmp_path / "home"))
    code, out, err = run_cli(["models", "--json"])
    assert code == 0, err
    assert "mine" in [json.loads(line)["name"] for line in out.splitlines()]
    assert sorted(path.name for path in models.iterdir()) == ["mine"]
    load_model_folder(models / "mine")


# --- outputs that are inputs ----------------------------------------------------------------


def test_an_output_that_is_the_segmentation_is_refused_before_any_work(case, tmp_path):
    segmentation = shutil.copy(case["segmentation"], tmp_path / "segmentation.nrrd")
    before = Path(segmentation).read_bytes()
    link = tmp_path / "hard-link.nrrd"
    os.link(segmentation, link)
    symlink = tmp_path / "symlink.nrrd"
    symlink.symlink_to(segmentation)
    for output in (segmentation, tmp_path / "sub" / ".." / "segmentation.nrrd", link, symlink):
        (tmp_path / "sub").mkdir(exist_ok=True)
        code, out, err = run_cli(synthesize(case, output, "--progress", "json", segmentation=segmentation))
        assert_one_line_error(code, err, "is the same file as --segmentation")
        assert "error" in json.loads(out.splitlines()[-1])
        assert Path(segmentation).read_bytes() == before


def test_superres_refuses_an_uncertainty_map_over_its_input(tmp_path):
    thick = tmp_path / "thick.nrrd"
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((6, 16, 16)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 4.0))
    sitk.WriteImage(image, str(thick))
    before = thick.read_bytes()
    code, _, err = run_cli(["superres", "--input", thick, "--output", tmp_path / "fine.nrrd", "--samples", 2,
                            "--uncertainty", thick, "--device", "cpu"])
    assert_one_line_error(code, err, "--uncertainty")
    assert "same file as --input" in err and thick.read_bytes() == before
    code, _, err = run_cli(["superres", "--input", thick, "--output", thick, "--device", "cpu"])
    assert_one_line_error(code, err, "same file as --input")


def test_a_batch_case_whose_output_is_its_input_fails_in_its_own_line(case, tmp_path):
    segmentation = shutil.copy(case["segmentation"], tmp_path / "segmentation.nrrd")
    before = Path(segmentation).read_bytes()
    manifest = tmp_path / "cases.csv"
    manifest.write_text("segmentation,output,seed\nsegmentation.nrrd,segmentation.nrrd,1\n"
                        "segmentation.nrrd,good.nrrd,2\n")
    code, out, err = run_cli(["batch", "--manifest", manifest, "--model", case["model"], "--device", "cpu",
                              "--progress", "json"])
    lines = {line["case"]: line for line in map(json.loads, out.splitlines())}
    assert code == 1 and "Traceback" not in err
    assert lines[2]["status"] == "failed"
    assert "is the same file as the segmentation of row 2" in lines[2]["error"]
    assert lines[3]["status"] == "done" and read_volume(tmp_path / "good.nrrd")
    assert Path(segmentation).read_bytes() == before


# --- broken user model folders --------------------------------------------------------------


@pytest.fixture
def broken_home(tmp_path, monkeypatch, case):
    """A user folder holding a good model beside three broken ones."""
    home = tmp_path / "home"
    models = home / "models"
    models.mkdir(parents=True)
    deep = models / "deep"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (models / "invalid").mkdir()
    (models / "invalid" / "config.json").write_text('{"name": ')
    (models / "folder-config").mkdir()
    (models / "folder-config" / "config.json").mkdir()  # cannot be read as a file
    shutil.copytree(case["model"], models / "mine")
    monkeypatch.setenv(registry.HOME_VARIABLE, str(home))
    monkeypatch.setattr(registry, "_warned_folders", set())
    return home


def test_listing_models_skips_broken_user_folders_with_one_warning_each(broken_home):
    code, out, err = run_cli(["models", "--json"])
    assert code == 0 and "Traceback" not in err
    names = [json.loads(line)["name"] for line in out.splitlines()]
    assert {"demo", "demo-superres", "mine"} <= set(names)
    warnings = err.splitlines()
    assert len(warnings) == 3
    assert all(line.startswith("warning: skipping user model folder") for line in warnings)
    assert any("deep" in line and "nested too deeply" in line for line in warnings)
    assert any("invalid" in line and "not valid JSON" in line for line in warnings)


def test_models_resolve_by_name_beside_broken_folders(broken_home, case, tmp_path):
    code, _, err = run_cli(synthesize(case, tmp_path / "out.nrrd", model="mine"))
    assert code == 0, err
    assert "Traceback" not in err and err.count("warning: skipping") == 3
    assert registry.resolve_model("demo") == registry.SHIPPED_MODELS / "demo"
    code, _, err = run_cli(synthesize(case, tmp_path / "deep.nrrd", model="deep"))
    assert code == 1 and "Traceback" not in err and "nested too deeply" in err.splitlines()[-1]
    assert not (tmp_path / "deep.nrrd").exists()


# --- models that would write NaN ------------------------------------------------------------


def _broken_copy(case, tmp_path, name):
    folder = shutil.copytree(case["model"], tmp_path / name)
    return Path(folder)


def test_a_nan_weight_is_refused_naming_the_tensor(case, tmp_path):
    folder = _broken_copy(case, tmp_path, "nan-weight")
    tensors = load_file(str(folder / "diffusion.safetensors"))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(folder / "diffusion.safetensors"))
    code, _, err = run_cli(synthesize(case, tmp_path / "out.nrrd", model=folder))
    assert_one_line_error(code, err, f"tensor '{name}' holds NaN or infinite values")
    assert not (tmp_path / "out.nrrd").exists()


@pytest.mark.parametrize(("field", "value", "expected"), [
    (("scheduler", "beta_end"), 5.0, "'scheduler.beta_end' must be below 1"),
    (("latent", "scale_factor"), 1e-30, "produced NaN or infinite values"),  # finite weights, overflowing
])
def test_a_config_that_yields_nan_is_refused_before_writing(case, tmp_path, field, value, expected):
    folder = _broken_copy(case, tmp_path, "broken")
    config = json.loads((folder / "config.json").read_text())
    config[field[0]][field[1]] = value
    (folder / "config.json").write_text(json.dumps(config))
    output = tmp_path / "out.nrrd"
    code, _, err = run_cli(synthesize(case, output, model=folder))
    assert_one_line_error(code, err, expected)
    assert not output.exists()


@pytest.mark.parametrize(("change", "expected"), [
    ({"channels": [4, 8, 10**9]}, "more than 65536"),
    ({"channels": [4, 8, 8192]}, "but " and "holds"),  # fits the integer limit: sized on the meta device
])
def test_network_sizes_that_would_allocate_terabytes_are_refused_before_building(case, tmp_path, change,
                                                                                expected):
    folder = _broken_copy(case, tmp_path, "huge")
    config = json.loads((folder / "config.json").read_text())
    config["autoencoder"]["params"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    code, _, err = run_cli(synthesize(case, tmp_path / "out.nrrd", model=folder))
    assert_one_line_error(code, err, expected)
    assert time.perf_counter() - started < 20  # nothing of that size was built


# --- bad geometry and numbers ---------------------------------------------------------------


def _nrrd(path: Path, directions, origin=(0.0, 0.0, 0.0), values=None) -> Path:
    array = np.zeros((10, 12, 14), np.int16) if values is None else values
    array[3:7, 3:8, 3:9] = np.maximum(array[3:7, 3:8, 3:9], 1)
    nrrd.write(str(path), array, {"space": "left-posterior-superior", "space directions": directions,
                                  "space origin": list(origin)})
    return path


def _nifti(path: Path, edit) -> Path:
    array = np.zeros((10, 12, 14), np.int16)
    array[3:7, 3:8, 3:9] = 1
    header = nibabel.Nifti1Image(array, np.eye(4)).header
    edit(header)
    nibabel.save(nibabel.Nifti1Image(array, None, header), str(path))
    return path


def _no_forms(header):
    header.set_sform(None, code=0)
    header.set_qform(None, code=0)


def _nan_sform(header):
    header.set_qform(None, code=0)
    header["srow_x"] = [np.nan, 0, 0, 0]


def _zero_sform(header):
    header.set_qform(None, code=0)
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = [0, 0, 0, 0]


EYE = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
GEOMETRY_CASES = {
    "singular direction": (lambda d: _nrrd(d / "s.nrrd", [[1, 0, 0], [1, 0, 0], [0, 0, 1]]),
                           "singular direction matrix"),
    "zero spacing": (lambda d: _nrrd(d / "s.nrrd", [[0, 0, 0], [0, 1, 0], [0, 0, 1]]), "voxel spacing"),
    "nan direction": (lambda d: _nrrd(d / "s.nrrd", [[np.nan, 0, 0], [0, 1, 0], [0, 0, 1]]), "NaN"),
    "nan origin": (lambda d: _nrrd(d / "s.nrrd", EYE, origin=(np.nan, 0, 0)), "NaN"),
    "huge spacing": (lambda d: _nrrd(d / "s.nrrd", [[1e300, 0, 0], [0, 1, 0], [0, 0, 1]]),
                     "more than 10000 mm"),
    "huge origin": (lambda d: _nrrd(d / "s.nrrd", EYE, origin=(1e300, 0, 0)), "origin"),
    "nifti without sform and qform": (lambda d: _nifti(d / "s.nii.gz", _no_forms), "without orientation"),
    "nifti nan sform": (lambda d: _nifti(d / "s.nii.gz", _nan_sform), "NaN or infinite values in its sform"),
    "nifti zero sform": (lambda d: _nifti(d / "s.nii.gz", _zero_sform), "singular"),
    "label beyond int32": (lambda d: _nrrd(d / "s.nrrd", EYE, values=np.full((10, 12, 14), 2**40, np.int64)),
                           "outside the 32-bit range"),
    "float label beyond int32": (lambda d: _nrrd(d / "s.nrrd", EYE, values=np.full((10, 12, 14), 3e9)),
                                 "outside the 32-bit range"),
}


@pytest.mark.parametrize("name", GEOMETRY_CASES)
def test_bad_geometry_and_label_values_are_one_line(case, tmp_path, name):
    make, expected = GEOMETRY_CASES[name]
    segmentation = make(tmp_path)
    code, _, err = run_cli(synthesize(case, tmp_path / "out.nrrd", segmentation=segmentation))
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out.nrrd").exists()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--seed", "-1"], "--seed: must be from 0 to"),
    (["--seed", str(2**63)], "--seed: must be from 0 to"),
    (["--seed", "9" * 5000], "--seed: must be a whole number"),
    (["--steps", str(10**30)], "--steps: must be at most"),
])
def test_huge_or_negative_numbers_in_flags_are_usage_errors(case, tmp_path, flags, expected):
    code, _, err = run_cli(synthesize(case, tmp_path / "out.nrrd", *flags))
    assert_one_line_error(code, err, expected, exit_code=2)


def test_superres_refuses_huge_sample_counts_and_tiny_spacings(tmp_path):
    thick = tmp_path / "thick.nrrd"
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((6, 16, 16)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 4.0))
    sitk.WriteImage(image, str(thick))
    arguments = ["superres", "--input", thick, "--output", tmp_path / "fine.nrrd", "--device", "cpu"]
    code, _, err = run_cli([*arguments, "--samples", 10**6])
    assert_one_line_error(code, err, "--samples: must be at most 64", exit_code=2)
    code, _, err = run_cli([*arguments, "--spacing", "1e-300"])
    assert_one_line_error(code, err, "too large; pass a coarser --spacing")
    code, _, err = run_cli([*arguments, "--seed", 2**63 - 2, "--samples", 4])
    assert_one_line_error(code, err, "runs past the largest seed", exit_code=2)


# --- the top-level handler ------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_naming_a_log_with_the_traceback(case, tmp_path, monkeypatch):
    from VCMSynthesisLib import conditions

    monkeypatch.setenv(registry.HOME_VARIABLE, str(tmp_path / "home"))

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug " + uuid.uuid4().hex)

    monkeypatch.setattr(conditions, "assemble_conditions", broken)
    code, out, err = run_cli(synthesize(case, tmp_path / "out.nrrd", "--progress", "json"))
    assert_one_line_error(code, err, "internal error (ZeroDivisionError: a bug ")
    log = Path(err.split("the traceback is in ")[1].split(";")[0])
    assert log.parent == tmp_path / "home" / "logs"
    assert "Traceback" in log.read_text() and "def broken" not in err and "in broken" in log.read_text()
    assert json.loads(out.splitlines()[-1])["error"] == err.splitlines()[-1].removeprefix("error: ")
    assert not (tmp_path / "out.nrrd").exists()


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    # `models` no longer imports torch (the catalogue is torch-free); `synthesize` does as it starts.
    labels = LIB_PARENT / "Resources" / "SampleData" / "demo-tissue-labels.nii.gz"
    process = subprocess.Popen([sys.executable, "-m", "VCMSynthesisLib", "synthesize", "--model", "demo",
                                "--segmentation", str(labels), "--output", str(tmp_path / "out.nrrd")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cli_environment())
    maps = Path(f"/proc/{process.pid}/maps")
    if not maps.exists():
        process.kill()
        pytest.skip("needs /proc to see the process importing torch")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text():  # inside `import torch`: start-up, not the command
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    # before the subcommands' imports (`__main__`) or during them (`cli.main`'s handler)
    assert err.strip() in ("cancelled while starting: nothing was written", "cancelled: nothing was written")
    assert out == ""
