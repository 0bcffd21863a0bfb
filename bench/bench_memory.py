"""Calibrate the memory guard: estimated against measured peak memory of one synthesis run.

For autoencoders of several widths and grids it builds a random model folder, runs one
1-step sampling (conditions -> sampler -> decoded image) in a fresh process, and measures the
peak resident memory above the process's footprint after its imports (`ru_maxrss` minus
VmRSS before loading the model). The table shows `memory.estimate_peak_bytes` beside it and
the number of full-grid feature maps the measurement implies, which is what
`memory.ACTIVATION_MAPS` should cover.

    .venv/bin/python bench/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "VCMSynthesis"), str(ROOT / "VCMSynthesis" / "Testing" / "Python")]

CASES = [  # (autoencoder channels, grid)
    ([16, 32, 32], (48, 48, 48)),
    ([16, 32, 32], (64, 64, 64)),
    ([32, 64, 64], (64, 64, 64)),
    ([16, 32, 64], (80, 96, 80)),  # the demo model's autoencoder and grid
]

MEASURE = r"""
import json, resource, sys, torch
from pathlib import Path
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.sampler import sample

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
before = rss()
model = load_model_folder(sys.argv[1])
condition = torch.zeros(1, len(model.config.condition_channel_names), *model.config.grid.size)
sample(model, condition, steps=1)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - before}))
"""


def build_folder(folder: Path, channels: list[int], grid: tuple[int, int, int]) -> Path:
    from tiny_models import tiny_config, tiny_networks
    from VCMSynthesisLib.model_config import ModelConfig
    from VCMSynthesisLib.model_folder import save_model_folder

    data = tiny_config(grid=(8, 8, 8)).to_dict()
    data["autoencoder"]["params"]["channels"] = channels
    data["autoencoder"]["params"]["norm_num_groups"] = 8
    data["grid"]["size"] = list(grid)
    config = ModelConfig.from_dict(data, source="bench")
    return save_model_folder(folder, config, *tiny_networks(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    from VCMSynthesisLib.memory import MARGIN_BYTES, estimate_peak_bytes
    from VCMSynthesisLib.model_config import ModelConfig

    print(f"{'autoencoder':>14} {'grid':>10} {'estimate MiB':>13} {'measured MiB':>13} {'implied maps':>13}")
    with tempfile.TemporaryDirectory() as scratch:
        for index, (channels, grid) in enumerate(CASES):
            folder = build_folder(Path(scratch) / f"m{index}", channels, grid)
            config = ModelConfig.load(folder / "config.json")
            estimate = estimate_peak_bytes(config, folder, "cpu")
            completed = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True,
                                       text=True, check=True, env={"PYTHONPATH": sys.path[0]})
            measured = json.loads(completed.stdout.splitlines()[-1])["measured"]
            voxels = grid[0] * grid[1] * grid[2]
            weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            conditions = (len(config.condition_channel_names) + 1) * voxels * 4
            maps = (measured - weights - conditions) / (max(channels[:2]) * voxels * 4)
            print(f"{str(channels):>14} {'x'.join(map(str, grid)):>10} {estimate / 2**20:>13.0f} "
                  f"{measured / 2**20:>13.0f} {maps:>13.2f}")
    print(f"(estimate includes a {MARGIN_BYTES / 2**20:.0f} MiB margin)")


if __name__ == "__main__":
    main()
