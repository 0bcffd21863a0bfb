"""Load test of `vcm-synthesis serve`: N clients x M jobs on loopback, every result verified.

Starts the server in a subprocess on a free port (tiny model 'tiny' in a temporary user
folder, or a shipped model with `--model demo`), then N client threads each run M panel-style
job folders one after another through `remote.run_remote_job` (upload, queue, progress,
download, sha256). Prints a table: jobs, wall time, throughput, p50/p95 latency (submit to the
result in place), results intact (the downloaded file's sha256 equals the server's and the
image reads back), and the model-load seconds of the first job (cold) against the median of
the others (warm: the server keeps the model loaded, which a worker process per job pays each
time, on top of its start-up and imports; see bench_worker.py).

Usage: .venv/bin/python bench/bench_server.py [--clients 4] [--jobs 5] [--model tiny|demo]
       [--steps N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "VCMSynthesis"), str(REPO / "VCMSynthesis" / "Testing" / "Python")]

from tiny_models import make_tiny_model_folder  # noqa: E402
from VCMSynthesisLib.checksums import Checksums  # noqa: E402
from VCMSynthesisLib.errors import UserError  # noqa: E402
from VCMSynthesisLib.jobs import synthesis_job  # noqa: E402
from VCMSynthesisLib.model_config import ModelConfig  # noqa: E402
from VCMSynthesisLib.registry import resolve_model  # noqa: E402
from VCMSynthesisLib.remote import Server, run_remote_job  # noqa: E402
from VCMSynthesisLib.runtime import DEVICES  # noqa: E402
from VCMSynthesisLib.volumes import read_volume  # noqa: E402


def start_server(work: Path, device: str) -> tuple[subprocess.Popen, Server]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_urlsafe(32)
    (work / "token").write_text(token)
    environment = {**os.environ, "PYTHONPATH": str(REPO / "VCMSynthesis"),
                   "VCM_SYNTHESIS_HOME": str(work / "home")}
    process = subprocess.Popen([sys.executable, "-m", "VCMSynthesisLib", "serve", "--port", str(port),
                                "--token-file", str(work / "token"), "--work-dir", str(work / "server"),
                                "--device", device, "--max-jobs", "1000"], env=environment)
    server = Server(url=f"http://127.0.0.1:{port}", token=token)
    deadline = time.monotonic() + 120
    while True:
        try:
            server.info()
            return process, server
        except UserError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


def write_segmentation(path: Path, config: ModelConfig) -> None:
    """Nested balls of the model's labels, on its grid size at its spacing."""
    shape = tuple(reversed(config.grid.size))
    radius = np.sqrt(sum((axis - (n - 1) / 2) ** 2 for axis, n in zip(np.indices(shape), shape, strict=True)))
    volume = np.zeros(shape, np.int16)
    values = sorted(label.value for label in config.labels if label.value != 0)
    for number, value in enumerate(values):
        volume[radius < min(shape) / 2 * (1 - number / len(values))] = value
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(config.grid.spacing)
    sitk.WriteImage(image, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=5, help="jobs per client")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, 16^3) or a shipped model name")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vcm-bench-server-"))
    try:
        if args.model == "tiny":
            folder = make_tiny_model_folder(work / "home" / "models" / "tiny")
        else:
            folder = resolve_model(args.model)
        config = ModelConfig.load(folder / "config.json")
        modalities = [modality.name for modality in config.modalities]
        segmentation = work / "segmentation.nrrd"
        write_segmentation(segmentation, config)
        for name in modalities:
            values = np.random.default_rng(0).random(tuple(reversed(config.grid.size))) * 100
            values = values.astype(np.float32)
            sitk.WriteImage(sitk.GetImageFromArray(values), str(work / f"{name}.nrrd"))
        process, server = start_server(work, args.device)
        latencies, loads, intact, failures = [], [], [], []
        lock = threading.Lock()

        def client(number: int) -> None:
            for index in range(args.jobs):
                job_folder = work / "clients" / f"{number}-{index}"
                job_folder.mkdir(parents=True)
                shutil.copy(segmentation, job_folder / "segmentation.nrrd")
                for name in modalities:
                    shutil.copy(work / f"{name}.nrrd", job_folder / f"{name}.nrrd")
                job = synthesis_job(job_folder, model=args.model,
                                    segmentation=job_folder / "segmentation.nrrd",
                                    modalities={name: job_folder / f"{name}.nrrd" for name in modalities},
                                    steps=args.steps, seed=number * args.jobs + index)
                start = time.perf_counter()
                try:
                    final = run_remote_job(job, server)
                except UserError as error:
                    with lock:
                        failures.append(str(error))
                    continue
                latency = time.perf_counter() - start
                ok = Checksums.of_file(job.output).sha256 == final["sha256"]
                ok = ok and read_volume(job.output) is not None
                with lock:
                    latencies.append(latency)
                    loads.append((final["timings"]["load_s"], time.monotonic()))
                    intact.append(ok)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(number,)) for number in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        process.terminate()
        process.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = args.clients * args.jobs
    ordered = [load for load, _ in sorted(loads, key=lambda pair: pair[1])]
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    print(f"model {args.model}, device {args.device}, {args.clients} clients x {args.jobs} jobs, "
          f"steps {args.steps or config.sampling_steps}")
    print("| jobs | wall s | jobs/s | p50 latency s | p95 latency s | intact | failed | load s cold / warm |")
    print("|---|---|---|---|---|---|---|---|")
    warm = statistics.median(ordered[1:]) if len(ordered) > 1 else float("nan")
    print(f"| {total} | {wall:.2f} | {len(latencies) / wall:.2f} | {statistics.median(latencies):.3f} | "
          f"{quantiles[18]:.3f} | {sum(intact)}/{total} | {len(failures)} | {ordered[0]:.3f} / {warm:.4f} |")
    for failure in failures:
        print(f"failed: {failure}")
    sys.exit(0 if sum(intact) == total else 1)


if __name__ == "__main__":
    main()
