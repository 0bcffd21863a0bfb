"""Benchmark of the Slicer scene glue: what the panel adds around the worker, per volume size.

With slicer-core's real MRML scene: a reference volume (oblique, 1 mm) and a three-segment
segmentation drawn on it; times `scene.export_segmentation` (segments -> labelmap NRRD on the
reference grid), `scene.export_volume` (a modality volume -> NRRD) and `scene.load_result` (the
worker's NRRD -> a new volume node). Medians of `--repeats` runs, in a table.

Target: export + load <= 2 s for a 256^3 reference (small next to minutes of sampling).

Usage: .venv/bin/python bench/bench_scene.py [--sizes 64,128,256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "VCMSynthesis"), str(REPO / "VCMSynthesis" / "Testing" / "Python")]

from slicer_scenes import GEOMETRIES, add_segmentation, add_volume, new_scene  # noqa: E402
from VCMSynthesisLib import scene  # noqa: E402


def case(size: int):
    mrml = new_scene()
    affine = GEOMETRIES["oblique"].copy()
    affine[:3, :3] /= 1.5  # 1 mm voxels
    rng = np.random.default_rng(0)
    reference = add_volume(mrml, affine, rng.random((size, size, size), dtype=np.float32))
    labelmap = np.zeros((size, size, size), np.uint8)
    quarter = size // 4
    labelmap[quarter:-quarter, quarter:-quarter, quarter:-quarter] = 1
    labelmap[size // 3 : -size // 3, size // 3 : -size // 3, size // 3 : -size // 3] = 2
    labelmap[:quarter, :quarter, :quarter] = 3
    segmentation = add_segmentation(mrml, reference, labelmap, {1: "a", 2: "b", 3: "c"})
    mapping = {segment_id: value for value, segment_id in enumerate(scene.segment_names(segmentation), 1)}
    return mrml, reference, segmentation, mapping


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    columns = ("export seg (s)", "export volume (s)", "load result (s)", "total (s)")
    print(f"{'size':>6} " + " ".join(f"{column:>18}" for column in columns))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for size in (int(text) for text in args.sizes.split(",")):
            mrml, reference, segmentation, mapping = case(size)
            seg = median_seconds(
                lambda: scene.export_segmentation(segmentation, mapping, folder / "s.nrrd", reference),  # noqa: B023
                args.repeats,
            )
            volume = median_seconds(lambda: scene.export_volume(reference, folder / "v.nrrd"), args.repeats)  # noqa: B023
            nodes = []
            load = median_seconds(
                lambda: nodes.append(scene.load_result(folder / "v.nrrd", mrml, next_to=segmentation)),  # noqa: B023
                args.repeats,
            )
            values = (seg, volume, load, seg + volume + load)
            print(f"{size:>6} " + " ".join(f"{value:>18.3f}" for value in values))


if __name__ == "__main__":
    main()
