"""bench/gpu_bench.sh end to end on the CPU (--quick: the tiny model), as a device machine runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def test_gpu_bench_runs_end_to_end_on_the_cpu(tmp_path):
    rows_file = tmp_path / "gpu_bench.json"
    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_bench.sh"), "--device", "cpu", "--quick",
                             "--repeats", "1", "--threads", "1", "--json", str(rows_file)],
                            capture_output=True, text=True, env=environment, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(rows_file.read_text())
    options = report["options"]
    assert [(row["precision"], row["channels_last_3d"]) for row in options] == [
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    for row in options:
        assert row["finite"] and min(row["base_ms"], row["vcm_ms"], row["encoder_s"], row["decode_s"]) > 0
        assert row["total_full_s"] == pytest.approx(
            row["encoder_s"] + 50 * (row["base_ms"] + row["vcm_ms"]) / 1000 + row["decode_s"])
    demo = json.loads((REPO / "VCMSynthesis" / "Resources" / "Models" / "demo" / "config.json").read_text())
    few_step = (demo["sampling"]["scheduler"], demo["sampling"]["steps"])
    assert [(run["scheduler"], run["steps"]) for run in report["end_to_end"]] == [("ddim", 50), few_step]
    assert all(run["wall_s"] >= run["model_s"] > 0 for run in report["end_to_end"])
    assert "| precision | cudnn.benchmark | channels_last_3d | base ms/step |" in result.stdout
    assert f"| {few_step[0]} | {few_step[1]} |" in result.stdout


def test_gpu_bench_without_cuda_says_what_to_do():
    if subprocess.run([sys.executable, "-c", "import torch; assert not torch.cuda.is_available()"],
                      check=False).returncode:
        pytest.skip("this machine has a CUDA device")
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_bench.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "no CUDA device here; use --device cpu (with --quick for the tiny model)"
