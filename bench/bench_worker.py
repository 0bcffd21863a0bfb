"""Benchmark of the worker process: end-to-end wall time against the models' own forward time.

Runs `python -m VCMSynthesisLib synthesize ... --progress json` as a subprocess, as Slicer does,
and compares its wall time (start to exit) with the seconds the sampler spent in the networks'
forward passes (`timings.model_s` of the result line). Also times a bare process that starts
and imports the worker's modules. Medians of `--repeats` runs, each case with `--steps` steps:
  tiny         the test suite's tiny model (16^3 grid)
  demo-sized   random weights with the demo model's sizes (the training/configs/demo_*.yaml
               networks, 80x96x80 grid, 4 labels)
  demo         the shipped demo model, if `VCMSynthesis/Resources/Models/demo` exists
Inputs: a segmentation (nested balls of every label) and any modality, 1 mm, of the grid's size.

Targets: overhead (wall / model) <= 1.15x; process start + imports <= 5 s.

Usage: .venv/bin/python bench/bench_worker.py [--cases tiny,demo-sized,demo] [--repeats 5]
       [--steps 50] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _demo_sized_model(folder: Path) -> Path:
    """A random-weight model folder with the demo model's networks, grid and label table."""
    import yaml
    from tiny_models import tiny_networks
    from VCMSynthesisLib.model_config import ModelConfig
    from VCMSynthesisLib.model_folder import save_model_folder

    configs = REPO / "training" / "configs"
    autoencoder = yaml.safe_load((configs / "demo_autoencoder.yaml").read_text())["autoencoder"]
    diffusion = yaml.safe_load((configs / "demo_diffusion.yaml").read_text())
    adapter = yaml.safe_load((configs / "demo_adapter_labels.yaml").read_text())
    labels = adapter["conditions"]["labels"]
    latent = autoencoder["latent_channels"]
    adapter_params = {**adapter["adapter"], "latent_channels": latent, "condition_channels": len(labels)}
    config = ModelConfig.from_dict({
        "format_version": 1, "name": "demo-sized", "task": "synthesis", "description": "random weights",
        "grid": {"spacing": [2.0, 2.0, 2.0], "size": [80, 96, 80], "orientation": "RAS"},
        "intensity": {"range": [0.0, 1.0]},
        "autoencoder": {"weights": "autoencoder.safetensors", "params": autoencoder},
        "diffusion": {"weights": "diffusion.safetensors", "params": diffusion["diffusion"],
                      "covariates": None},
        "adapter": {"weights": "adapter.safetensors", "params": adapter_params},
        "latent": {"channels": latent, "scale_factor": 1.0},
        "scheduler": diffusion["scheduler"],
        "sampling": {"scheduler": "ddim", "steps": 50},
        "conditions": {"labels": {"table": labels}, "modalities": []},
    }, source="demo-sized bench model")
    return save_model_folder(folder, config, *tiny_networks(config))


def _run_worker(model: Path, inputs: list[str], output: Path, steps: int, device: str) -> dict:
    command = [sys.executable, "-m", "VCMSynthesisLib", "synthesize", "--model", str(model), *inputs,
               "--output", str(output), "--device", device, "--progress", "json", "--steps", str(steps)]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"worker failed: {completed.stderr.strip().splitlines()[-1]}")
    timings = json.loads(completed.stdout.splitlines()[-1])["timings"]
    return {"wall_s": wall, **timings}


def _imports_s() -> tuple[float, float]:
    """(wall, CPU) seconds of a process that starts and imports the worker's modules.

    CPU time (user + system of the child) hardly depends on other load on the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True, env=ENV)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny,demo-sized,demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    imports = [_imports_s() for _ in range(args.repeats)]
    wall, cpu = (statistics.median(values) for values in zip(*imports, strict=True))
    print(f"process start + imports: {wall:.2f} s wall, {cpu:.2f} s CPU (medians of {args.repeats}; "
          f"target <= 5 s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n")
    columns = ("case", "steps", "wall_s", "model_s", "overhead", "startup_s", "load_s", "conditions_s",
               "write_s")
    print(" ".join(f"{c:>12}" for c in columns))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        sys.path.insert(0, str(REPO / "VCMSynthesis" / "Testing" / "Python"))
        from tiny_models import make_tiny_model_folder

        wanted = args.cases.split(",")
        cases = []
        if "tiny" in wanted:
            cases.append(("tiny", make_tiny_model_folder(scratch / "tiny")))
        if "demo-sized" in wanted:
            cases.append(("demo-sized", _demo_sized_model(scratch / "demo-sized")))
        if "demo" in wanted and (DEMO_FOLDER / "config.json").is_file():
            cases.append(("demo", DEMO_FOLDER))
        for name, model in cases:
            config = json.loads((model / "config.json").read_text())
            case_folder = scratch / f"{name}-inputs"
            case_folder.mkdir()
            inputs = _inputs(case_folder, config)
            runs = [_run_worker(model, inputs, case_folder / f"out{i}.nrrd", args.steps, args.device)
                    for i in range(args.repeats)]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(f"{name:>12} {args.steps:>12} {median['wall_s']:>12.2f} {median['model_s']:>12.2f} "
                  f"{median['wall_s'] / median['model_s']:>11.2f}x {median['startup_s']:>12.2f} "
                  f"{median['load_s']:>12.2f} {median['conditions_s']:>12.3f} {median['write_s']:>12.3f}")
    print("\noverhead = worker wall time (subprocess start to exit) / summed network forward time "
          "(target <= 1.15x)")


if __name__ == "__main__":
    main()
