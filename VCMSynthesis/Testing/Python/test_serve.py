"""`vcm-synthesis serve` and its client on loopback: a real uvicorn server in a subprocess on a
free port, tiny random models, real uploads (`serve.py`, `remote.py`)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_edit import case, edit_arguments  # noqa: F401 - `case` is a fixture
from test_superres import thick_scan, tiny_superres_model, write_scan  # noqa: F401 - a fixture
from test_worker import SHAPE, run_cli
from tiny_models import make_tiny_model_folder
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.jobs import synthesis_job
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.remote import RemoteRun, Server, check_server, job_bundle, run_remote_job
from VCMSynthesisLib.scene import read_provenance
from VCMSynthesisLib.serve import start_warnings
from VCMSynthesisLib.volumes import read_volume
from VCMSynthesisLib.worker import SynthesisRequest, synthesize
from volume_cases import blob, geometry_of, make_image, write_case

LIB_PARENT = Path(__file__).resolve().parents[2]
LONG_STEPS = 1000  # a job that runs for seconds, to cancel or kill mid-way


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(folder: Path, *options: str):
    """`vcm-synthesis serve` in a subprocess, with the tiny model 'tiny' in its user folder."""
    home = folder / "home"
    if not (home / "models" / "tiny").is_dir():
        make_tiny_model_folder(home / "models" / "tiny")
        make_tiny_model_folder(home / "models" / "tiny-labels", modalities=None)  # test_edit's model
    token_file = folder / "token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    environment = {**os.environ, "PYTHONPATH": str(LIB_PARENT), "VCM_SYNTHESIS_HOME": str(home),
                   "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "VCMSynthesisLib", "serve", "--port", str(port),
         "--token-file", str(token_file), "--work-dir", str(folder / "work"), "--device", "cpu", *options],
        env=environment, stderr=subprocess.PIPE, text=True)
    server = Server(url=f"http://127.0.0.1:{port}", token=token_file.read_text().strip())
    deadline = time.monotonic() + 60
    while True:
        try:
            server.info()
            break
        except UserError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the server did not start: {process.stderr.read()}") from None
            time.sleep(0.2)
    try:
        yield {"server": server, "token_file": token_file, "work": folder / "work", "process": process,
               "model": home / "models" / "tiny", "home": home}
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve"), "--max-upload-mb", "1") as served:
        yield served


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An oblique segmentation (LPS NRRD) and a T2 (NIfTI) for the tiny model."""
    folder = tmp_path_factory.mktemp("inputs")
    labels = np.zeros(SHAPE, np.int16)
    labels[blob(SHAPE, (7, 8, 9), (5, 6, 7))] = 1
    labels[blob(SHAPE, (7, 8, 9), (3, 3, 3))] = 2
    t2 = np.random.default_rng(0).random(SHAPE).astype(np.float32) * 300.0
    return {"segmentation": write_case(make_image(labels, "oblique"), folder, "segmentation", "nrrd-lps"),
            "t2": write_case(make_image(t2, "oblique"), folder, "t2", "nifti")}


def panel_job(folder: Path, inputs, seed: int = 0, steps: int | None = None, scheduler: str | None = None):
    """A job folder as the panel writes it: the conditions inside, `jobs.synthesis_job`."""
    folder.mkdir(parents=True)
    segmentation = Path(shutil.copy(inputs["segmentation"], folder / "segmentation.nrrd"))
    t2 = Path(shutil.copy(inputs["t2"], folder / "t2.nii.gz"))
    return synthesis_job(folder, model="tiny", segmentation=segmentation, modalities={"T2": t2}, seed=seed,
                         steps=steps, scheduler=scheduler)


def post(server: Server, body: bytes, token: str | None = None) -> tuple[int, str]:
    """A raw `POST /jobs`: (status, first line of the answer)."""
    parsed = server.url.split("//")[1]
    host, port = parsed.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Authorization": f"Bearer {token or server.token}"}
    connection.request("POST", "/jobs", body=body, headers=headers)
    response = connection.getresponse()
    answer = response.read().decode()
    connection.close()
    return response.status, answer.splitlines()[0] if answer else ""


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as bundle:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def job_description(*arguments: str) -> bytes:
    return json.dumps({"arguments": list(arguments)}).encode()


def test_remote_synthesis_equals_local_with_exact_geometry(served, inputs, tmp_path):
    common = ["--segmentation", inputs["segmentation"], "--modality", f"T2={inputs['t2']}", "--seed", "3"]
    code, _, err = run_cli(["synthesize", "--model", served["model"], *common, "--device", "cpu",
                            "--output", tmp_path / "local.nrrd"])
    assert code == 0, err
    code, out, err = run_cli(["synthesize", "--model", "tiny", *common, "--output", tmp_path / "remote.nrrd",
                              "--server", served["server"].url, "--token-file", served["token_file"],
                              "--progress", "json"])
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["step"] for line in lines if "step" in line] == [1, 2, 3]
    assert lines[-1]["result"] == str(tmp_path / "remote.nrrd")
    local, remote = read_volume(tmp_path / "local.nrrd"), read_volume(tmp_path / "remote.nrrd")
    assert geometry_of(remote) == geometry_of(read_volume(inputs["segmentation"])) == geometry_of(local)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(remote), sitk.GetArrayFromImage(local))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.nrrd", "remote.nrrd"]
    assert list((served["work"] / "jobs").iterdir()) == []  # fetched results are removed


def test_a_remote_run_takes_the_scheduler_and_the_server_refuses_an_unknown_one(served, inputs, tmp_path):
    common = ["--segmentation", inputs["segmentation"], "--modality", f"T2={inputs['t2']}", "--seed", "3",
              "--scheduler", "ddpm"]
    code, _, err = run_cli(["synthesize", "--model", served["model"], *common, "--device", "cpu",
                            "--output", tmp_path / "local.nrrd"])
    assert code == 0, err
    code, _, err = run_cli(["synthesize", "--model", "tiny", *common, "--output", tmp_path / "remote.nrrd",
                            "--server", served["server"].url, "--token-file", served["token_file"]])
    assert code == 0, err
    local, remote = read_volume(tmp_path / "local.nrrd"), read_volume(tmp_path / "remote.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(remote), sitk.GetArrayFromImage(local))
    assert read_provenance(tmp_path / "remote.nrrd")["vcm_scheduler"] == "ddpm"
    assert read_provenance(tmp_path / "remote.nrrd") == read_provenance(tmp_path / "local.nrrd")

    # A job built elsewhere (`jobs` passes the name on unchecked) is refused before it is queued.
    status, answer = post(served["server"], job_bundle(panel_job(tmp_path / "job", inputs, scheduler="euler"))
                          .read_bytes())
    assert status == 400 and "--scheduler: invalid choice: 'euler'" in answer, answer
    assert "\n" not in json.loads(answer)["detail"]
    assert list((served["work"] / "jobs").iterdir()) == []


def test_a_wrong_or_missing_token_is_refused_in_one_line_before_any_work(served, inputs, tmp_path):
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_urlsafe(32))
    code, _, err = run_cli(["synthesize", "--model", "tiny", "--segmentation", inputs["segmentation"],
                            "--modality", f"T2={inputs['t2']}", "--output", tmp_path / "out.nrrd",
                            "--server", served["server"].url, "--token-file", wrong])
    assert code == 1 and err.count("\n") == 1 and "refused the access token" in err
    assert not (tmp_path / "out.nrrd").exists()
    status, answer = post(served["server"], b"x" * 4096, token="not-the-token")
    assert status == 401 and "token" in answer
    assert list((served["work"] / "jobs").iterdir()) == []


def test_an_unreachable_server_and_a_version_mismatch_are_one_line(served, inputs, tmp_path, monkeypatch):
    unreachable = Server(url=f"http://127.0.0.1:{_free_port()}", token="x" * 20)
    with pytest.raises(UserError, match="cannot reach the VCM Synthesis server"):
        unreachable.info()
    monkeypatch.setattr("VCMSynthesisLib.remote.__version__", "0.0.1")
    with pytest.raises(UserError, match=r"runs VCM Synthesis .* this client 0\.0\.1; install the same"):
        served["server"].info()


def test_four_clients_at_once_each_get_their_own_result(served, inputs, tmp_path):
    jobs = [panel_job(tmp_path / f"job{seed}", inputs, seed=seed) for seed in range(4)]
    failures = []

    def run(job):
        try:
            run_remote_job(job, served["server"])
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    model = load_model_folder(served["model"], "cpu")
    for seed, job in enumerate(jobs):
        local = tmp_path / f"local{seed}.nrrd"
        request = SynthesisRequest(segmentation=inputs["segmentation"], modalities={"T2": inputs["t2"]},
                                   output=local, seed=seed)
        synthesize(model, request)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(job.output)),
                                      sitk.GetArrayFromImage(read_volume(local)))


def test_a_client_that_goes_away_cancels_its_job_within_2_s(served, inputs, tmp_path):
    job = panel_job(tmp_path / "job", inputs, steps=LONG_STEPS)
    host, port = served["server"].url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", "/jobs", body=job_bundle(job).read_bytes(),
                       headers={"Authorization": f"Bearer {served['server'].token}"})
    response = connection.getresponse()
    job_id = json.loads(response.readline())["job"]
    while "step" not in json.loads(response.readline()):
        pass
    connection.close()
    gone = time.monotonic()
    while (served["work"] / "jobs" / job_id).exists():
        assert time.monotonic() - gone < 2.5, "the job still runs after its client went away"
        time.sleep(0.05)


@pytest.mark.parametrize(("files", "reason"), [
    ({"job.json": job_description("synthesize"), "../escape.nrrd": b"NRRD0004\n"}, "no paths"),
    ({"job.json": job_description("synthesize"), "seg.mhd": b"ObjectType = Image\n"}, "volumes and job.json"),
    ({"job.json": job_description("synthesize", "--model", "tiny", "--segmentation", "seg.nrrd",
                                  "--output", "out.nrrd"),
      "seg.nrrd": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                  b"data file: /etc/passwd\n\n"}, "separate data file"),
    ({"job.json": job_description("synthesize", "--model", "tiny", "--segmentation", "/etc/passwd",
                                  "--output", "out.nrrd")}, "is a path"),
    ({"job.json": job_description("synthesize", "--model", "tiny", "--segmentation", "seg.nii.gz",
                                  "--output", "../out.nrrd"),
      "seg.nii.gz": b"NRRD0004\ndatafile: /etc/passwd\n\n"}, "separate data file"),
    ({"job.json": job_description("synthesize", "--model", "/etc", "--segmentation", "x.nrrd",
                                  "--output", "out.nrrd"), "x.nrrd": b"NRRD0004\n\n"}, "not on this server"),
    ({"job.json": b"{not json"}, "no list of worker arguments"),
])
def test_uploads_naming_files_outside_the_job_are_refused(served, files, reason):
    status, answer = post(served["server"], tar_of(files))
    assert status == 400 and reason in answer
    assert list((served["work"] / "jobs").iterdir()) == []
    assert not any((folder / "escape.nrrd").exists() for folder in (served["work"], served["work"].parent))


def test_oversized_and_malformed_uploads_are_refused_in_one_line(served):
    status, answer = post(served["server"], b"\0" * (2 * 2**20))
    assert status == 413 and "at most 1 MiB" in answer
    status, answer = post(served["server"], b"this is not a tar archive" * 100)
    assert status == 400 and "not a tar archive" in answer
    assert list((served["work"] / "jobs").iterdir()) == []


def test_a_server_killed_mid_job_fails_the_client_in_one_line_within_15_s(inputs, tmp_path):
    with running_server(tmp_path / "server", "--max-jobs", "1", "--result-timeout-s", "1") as served:
        # A result nobody fetches is removed after --result-timeout-s.
        status, _ = post(served["server"], job_bundle(panel_job(tmp_path / "unfetched", inputs)).read_bytes())
        assert status == 200
        expiry = time.monotonic()
        while any((served["work"] / "jobs").iterdir()):
            assert time.monotonic() - expiry < 5, "an unfetched result outlived --result-timeout-s"
            time.sleep(0.1)
        job = panel_job(tmp_path / "job", inputs, steps=LONG_STEPS)
        steps, failure = threading.Event(), []

        def run():
            try:
                run_remote_job(job, served["server"], on_line=lambda line: "step" in line and steps.set())
            except UserError as error:
                failure.append((time.monotonic(), str(error)))

        thread = threading.Thread(target=run)
        thread.start()
        assert steps.wait(30)
        with pytest.raises(UserError, match="1 jobs queued or running"):  # 429
            run_remote_job(panel_job(tmp_path / "second", inputs), served["server"])
        os.kill(served["process"].pid, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(20)
    (ended, message), = failure
    assert ended - killed < 15 and "\n" not in message and "nothing was written" in message
    assert not job.output.exists()


def test_the_batch_script_runs_its_cases_on_the_server(served, inputs, tmp_path):
    script = Path(__file__).resolve().parents[2] / "Resources" / "Scripts" / "VCMSynthesisBatch.py"
    output = tmp_path / "out" / "batch.nii.gz"
    completed = subprocess.run(
        [sys.executable, str(script), "--segmentation", str(inputs["segmentation"]), "--modality",
         f"T2={inputs['t2']}", "--model", "tiny", "--seed", "5", "--output", str(output),
         "--server", served["server"].url, "--token-file", str(served["token_file"])],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert completed.returncode == 0, completed.stderr
    assert "step 3/3" in completed.stderr
    model = load_model_folder(served["model"], "cpu")
    local = tmp_path / "local.nii.gz"
    synthesize(model, SynthesisRequest(segmentation=inputs["segmentation"], modalities={"T2": inputs["t2"]},
                                       output=local, seed=5))
    remote = read_volume(output)
    assert geometry_of(remote) == geometry_of(read_volume(local))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(remote), sitk.GetArrayFromImage(read_volume(local)))
    # no job folder left; the remote NIfTI has the provenance sidecar of the local one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.nii.gz", "local.nii.gz.json", "out"]
    assert sorted(p.name for p in output.parent.iterdir()) == ["batch.nii.gz", "batch.nii.gz.json"]
    assert read_provenance(output) == read_provenance(local)
    assert read_provenance(output)["vcm_seed"] == "5" and read_provenance(output)["vcm_model"] == "tiny"


def test_cancel_is_one_request_and_stops_the_job_within_2_s(served, inputs, tmp_path):
    job = panel_job(tmp_path / "job", inputs, steps=LONG_STEPS)
    started, failure = threading.Event(), []

    def run():
        try:
            run_remote_job(job, served["server"], on_line=lambda line: "step" in line and started.set())
        except BaseException as error:  # noqa: BLE001 - Cancelled, checked below
            failure.append((time.monotonic(), error))

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    job_ids = [path.name for path in (served["work"] / "jobs").iterdir()]
    connection, _ = served["server"].request("DELETE", f"/jobs/{job_ids[0]}")
    connection.close()
    cancelled = time.monotonic()
    thread.join(10)
    (ended, error), = failure
    assert type(error).__name__ == "Cancelled" and ended - cancelled < 2
    assert not job.output.exists()


def test_a_remote_edit_equals_the_local_one(served, case, tmp_path):  # noqa: F811 - the fixture
    code, _, err = run_cli(edit_arguments(case, tmp_path / "local.nrrd", "--seed", "2"))
    assert code == 0, err
    remote_arguments = edit_arguments(case, tmp_path / "remote.nrrd", "--seed", "2", "--progress", "json")
    remote_arguments[remote_arguments.index("--model") + 1] = "tiny-labels"
    code, out, err = run_cli([*remote_arguments, "--server", served["server"].url,
                              "--token-file", served["token_file"]])
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["edited_voxels"] > 0
    local, remote = read_volume(tmp_path / "local.nrrd"), read_volume(tmp_path / "remote.nrrd")
    assert geometry_of(remote) == geometry_of(local) == geometry_of(read_volume(case["scan"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(remote), sitk.GetArrayFromImage(local))


def test_a_remote_output_naming_an_input_is_refused_and_the_input_kept(served, inputs, tmp_path):
    segmentation = Path(shutil.copy(inputs["segmentation"], tmp_path / "segmentation.nrrd"))
    before = segmentation.read_bytes()
    code, _, err = run_cli(["synthesize", "--model", "tiny", "--segmentation", segmentation, "--modality",
                            f"T2={inputs['t2']}", "--output", segmentation, "--server", served["server"].url,
                            "--token-file", served["token_file"]])
    assert code == 2 and err.count("\n") == 1 and "names an input" in err
    assert segmentation.read_bytes() == before


def test_a_remote_super_resolution_with_its_spread_equals_the_local_one(served, tiny_superres_model,  # noqa: F811
                                                                       tmp_path):
    shutil.copytree(tiny_superres_model, served["home"] / "models" / "tiny-superres")
    scan = write_scan(tmp_path / "thick.nrrd", thick_scan())
    common = ["superres", "--input", scan, "--samples", 2, "--spacing", 2.0, "--seed", 4]
    code, _, err = run_cli([*common, "--model", tiny_superres_model, "--output", tmp_path / "local.nii.gz",
                            "--uncertainty", tmp_path / "local-std.nrrd", "--device", "cpu"])
    assert code == 0, err
    code, _, err = run_cli([*common, "--model", "tiny-superres", "--output", tmp_path / "remote.nii.gz",
                            "--uncertainty", tmp_path / "remote-std.nrrd", "--server", served["server"].url,
                            "--token-file", served["token_file"]])
    assert code == 0, err
    for name in ("", "-std"):
        suffix = ".nrrd" if name else ".nii.gz"
        local = read_volume(tmp_path / f"local{name}{suffix}")
        remote = read_volume(tmp_path / f"remote{name}{suffix}")
        assert geometry_of(remote) == geometry_of(local)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(remote), sitk.GetArrayFromImage(local))
        # The provenance comes along: NRRD header fields, a NIfTI's sidecar.
        made_with = read_provenance(tmp_path / f"remote{name}{suffix}")
        assert made_with == read_provenance(tmp_path / f"local{name}{suffix}")
        assert made_with["vcm_seed"] == "4" and made_with["vcm_model"] == "tiny-superres"
    assert (tmp_path / "remote.nii.gz.json").is_file() and not (tmp_path / "remote-std.nrrd.json").exists()


def test_the_panels_remote_run_polls_like_a_worker_run_and_cancels(served, inputs, tmp_path):
    summary = check_server(served["server"].url, served["token_file"])
    assert summary.startswith("VCM Synthesis ") and " on cpu, " in summary and "tiny" in summary
    run = RemoteRun(panel_job(tmp_path / "done", inputs), served["server"])
    progress = []
    while run.running:
        progress += run.poll()
        time.sleep(0.02)
    progress += run.poll()
    outcome = run.outcome()
    assert outcome.status == "succeeded" and outcome.result.is_file()
    assert [event.step for event in progress] == [1, 2, 3]
    log = outcome.log_path.read_text()
    assert log.startswith(f"$ run on {served['server'].url}: synthesize") and '"result": ' in log
    run = RemoteRun(panel_job(tmp_path / "cancelled", inputs, steps=LONG_STEPS), served["server"])
    while not run.poll():
        time.sleep(0.02)
    run.cancel()
    cancelled = time.monotonic()
    outcome = run.wait(10)
    assert outcome.status == "cancelled" and time.monotonic() - cancelled < 2.5
    assert not run.job.output.exists()


def test_jobs_wait_in_arrival_order_and_are_told_their_place(served, inputs, tmp_path):
    long_job = panel_job(tmp_path / "long", inputs, steps=LONG_STEPS)
    started, lines, failures = threading.Event(), [], []

    def run(job, on_line):
        try:
            run_remote_job(job, served["server"], on_line=on_line)
        except BaseException as error:  # noqa: BLE001 - the long one is cancelled
            failures.append(type(error).__name__)

    first = threading.Thread(target=run, args=(long_job, lambda line: "step" in line and started.set()))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=run, args=(panel_job(tmp_path / "short", inputs), lines.append))
    second.start()
    while not any("queue" in line for line in lines):
        time.sleep(0.02)
    assert not any("step" in line for line in lines)  # it waits for the first
    long_id, = [path.name for path in (served["work"] / "jobs").iterdir()
                if path.is_dir() and f'"{LONG_STEPS}"' in (path / "job.json").read_text()]
    connection, _ = served["server"].request("DELETE", f"/jobs/{long_id}")
    connection.close()
    first.join(10)
    second.join(30)
    assert failures == ["Cancelled"]
    assert {"queue": 1} in lines and [line["step"] for line in lines if "step" in line] == [1, 2, 3]
    assert (tmp_path / "short" / "result.nrrd").is_file()


def test_serve_warns_about_other_addresses_and_a_token_others_can_read(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_urlsafe(32))
    token_file.chmod(0o600)
    assert start_warnings("127.0.0.1", token_file) == []
    token_file.chmod(0o644)
    first, second = start_warnings("0.0.0.0", token_file)
    assert "without TLS" in first and "reverse proxy" in first and "chmod 600" in second


def test_a_label_map_preset_travels_to_the_server_and_a_map_file_is_refused(served, inputs, tmp_path):
    remote = ["synthesize", "--model", "tiny", "--segmentation", inputs["segmentation"], "--modality",
              f"T2={inputs['t2']}", "--output", tmp_path / "out.nrrd", "--server", served["server"].url,
              "--token-file", served["token_file"]]
    label_map = tmp_path / "map.json"
    label_map.write_text('{"map": [{"value": 1, "label": 1}, {"value": 2, "label": 2}]}')
    code, _, err = run_cli([*remote, "--label-map", label_map])
    assert (code, err.count("\n")) == (2, 1) and "a label map file does not travel to a server" in err
    # The server reads the preset: its targets are names the tiny model lacks.
    code, _, err = run_cli([*remote, "--label-map", "aseg"])
    assert code == 1 and "label map 'aseg' maps" in err and "which model 'tiny' does not have" in err
    assert not (tmp_path / "out.nrrd").exists()
