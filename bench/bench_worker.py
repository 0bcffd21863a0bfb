"""Benchmark of the worker process: end-to-end wall time against the models' own forward time.

Runs `python -m VCMSynthesisLib synthesize ... --progress json` as a subprocess, as Slicer does,
and compares its wall time (start to exit) with the seconds the sampler spent in the networks'
forward passes (`timings.model_s` of the result line). Also times a bare process that starts
and imports the worker's modules. Medians of `--repeats` runs. Cases:
  tiny   the test suite's tiny model (16^3 grid) with `--steps` steps
  demo   the shipped demo model with its default steps, if `VCMSynthesis/Resources/Models/demo`
         exists (on a segmentation of its own grid's size)

Targets: overhead (wall / model) <= 1.15x; process start + imports <= 5 s.

Usage: .venv/bin/python bench/bench_worker.py [--cases tiny,demo] [--repeats 5] [--steps 50]
       [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
DEMO_FOLDER = REPO / "VCMSynthesis" / "Resources" / "Models" / "demo"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "VCMSynthesis")}
IMPORTS = ("import VCMSynthesisLib.cli, VCMSynthesisLib.worker, VCMSynthesisLib.sampler, "
           "VCMSynthesisLib.conditions, VCMSynthesisLib.volumes, VCMSynthesisLib.model_folder")


def _inputs(folder: Path, config: dict) -> list[str]:
    """A segmentation (a ball of each label) and any modalities, on the model's grid size, 1 mm."""
    size = config["grid"]["size"]
    shape = tuple(reversed(size))
    index = np.indices(shape)
    radius = np.sqrt(sum((axis - (n - 1) / 2) ** 2 for axis, n in zip(index, shape, strict=True)))
    labels = [row["value"] for row in (config["conditions"].get("labels") or {}).get("table", [])]
    arguments = []
    if labels:
        volume = np.zeros(shape, np.int16)
        outer = min(shape) / 2
        for number, value in enumerate(sorted(v for v in labels if v != 0)):
            volume[radius < outer * (1 - number / len(labels))] = value
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(folder / "segmentation.nrrd"))
        arguments += ["--segmentation", str(folder / "segmentation.nrrd")]
    for modality in config["conditions"].get("modalities") or []:
        path = folder / f"{modality['name']}.nrrd"
        values = (np.random.default_rng(0).random(shape) * 100).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
        arguments += ["--modality", f"{modality['name']}={path}"]
    return arguments


def _run_worker(model: Path, inputs: list[str], output: Path, steps: int | None, device: str) -> dict:
    command = [sys.executable, "-m", "VCMSynthesisLib", "synthesize", "--model", str(model), *inputs,
               "--output", str(output), "--device", device, "--progress", "json"]
    if steps is not None:
        command += ["--steps", str(steps)]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"worker failed: {completed.stderr.strip().splitlines()[-1]}")
    timings = json.loads(completed.stdout.splitlines()[-1])["timings"]
    return {"wall_s": wall, **timings}


def _imports_s() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True, env=ENV)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny,demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="steps for the tiny model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    imports = statistics.median(_imports_s() for _ in range(args.repeats))
    print(f"process start + imports: {imports:.2f} s (median of {args.repeats}; target <= 5 s)\n")
    columns = ("case", "steps", "wall_s", "model_s", "overhead", "startup_s", "load_s", "conditions_s",
               "write_s")
    print(" ".join(f"{c:>12}" for c in columns))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cases = []
        if "tiny" in args.cases:
            sys.path.insert(0, str(REPO / "VCMSynthesis" / "Testing" / "Python"))
            from tiny_models import make_tiny_model_folder

            cases.append(("tiny", make_tiny_model_folder(scratch / "tiny"), args.steps))
        if "demo" in args.cases and (DEMO_FOLDER / "config.json").is_file():
            cases.append(("demo", DEMO_FOLDER, None))
        for name, model, steps in cases:
            config = json.loads((model / "config.json").read_text())
            case_folder = scratch / f"{name}-inputs"
            case_folder.mkdir()
            inputs = _inputs(case_folder, config)
            runs = [_run_worker(model, inputs, case_folder / f"out{i}.nrrd", steps, args.device)
                    for i in range(args.repeats)]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            shown_steps = steps or config["sampling"]["steps"]
            print(f"{name:>12} {shown_steps:>12} {median['wall_s']:>12.2f} {median['model_s']:>12.2f} "
                  f"{median['wall_s'] / median['model_s']:>11.2f}x {median['startup_s']:>12.2f} "
                  f"{median['load_s']:>12.2f} {median['conditions_s']:>12.3f} {median['write_s']:>12.3f}")
    print("\noverhead = worker wall time (subprocess start to exit) / summed network forward time "
          "(target <= 1.15x)")


if __name__ == "__main__":
    main()
