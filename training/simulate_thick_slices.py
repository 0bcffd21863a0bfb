"""Simulate thick-slice scans from the demo subjects, to train and evaluate the super-resolution adapter.

A thick slice is the average of the true volume over a slab (`superres.slab_average`, the same
forward model the super-resolution uses for data consistency). Slabs are contiguous, of a random
thickness (default 3-7 mm) with a random offset of the first slab, stacked along the image axis
closest to superior-inferior (axial). In-plane voxels keep the true volume's grid.

    python training/simulate_thick_slices.py --manifest training/data/manifest.csv \
        --out training/data/thick --per-case 4

writes `<out>/<case>-thick<k>.nii.gz` and `<out>/manifest.csv`: the input manifest's rows (of
`--split`, default train) with paths rewritten relative to the new manifest, one row per version
(case `<case>-thick<k>`) and a `thick` column, so the adapter trainer reads it as any manifest
with a `thick` modality. `<out>/simulation.csv` records each version's thickness and offset.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path

import common
import numpy as np
import SimpleITK as sitk
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.superres import slab_average

PATH_COLUMNS = ("image", "labels", "t2")


def axial_axis(image: sitk.Image) -> int:
    """The image axis whose direction is closest to superior-inferior (physical z in LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2, :])))


def thick_grid(image: sitk.Image, axis: int, thickness_mm: float, offset_mm: float) -> sitk.Image:
    """Contiguous slabs of `thickness_mm` along `axis` covering the image's footprint.

    The first slab starts `offset_mm` (0 <= offset < thickness) before the footprint's edge, so
    slab boundaries fall anywhere relative to the true voxels.
    """
    if not 0.0 <= offset_mm < thickness_mm:
        raise ValueError(f"offset {offset_mm} must lie in [0, {thickness_mm})")
    spacing = list(image.GetSpacing())
    size = list(image.GetSize())
    length = size[axis] * spacing[axis]
    slabs = math.ceil((length + offset_mm) / thickness_mm)
    start = np.zeros(3)
    start[axis] = -0.5 - offset_mm / spacing[axis]  # footprint edge minus the offset, in voxels
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    first_corner = np.asarray(image.TransformContinuousIndexToPhysicalPoint(start.tolist()))
    spacing[axis] = thickness_mm
    size[axis] = slabs
    half_voxel = np.asarray(spacing) / 2.0
    half_voxel[[i for i in range(3) if i != axis]] = 0.0
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    # In-plane the first corner is already a voxel centre; along the axis move half a slab in.
    grid.SetOrigin((first_corner + direction @ half_voxel).tolist())
    return grid


def simulate_thick_slices(image: sitk.Image, thickness_mm: float, offset_mm: float,
                          axis: int | None = None) -> sitk.Image:
    """The thick-slice scan of `image`: slab averages on `thick_grid`, float32."""
    axis = axial_axis(image) if axis is None else axis
    return slab_average(image, thick_grid(image, axis, thickness_mm, offset_mm), axis)


def random_thick_slices(image: sitk.Image, rng: np.random.Generator,
                        thickness_range_mm: tuple[float, float] = (3.0, 7.0)
                        ) -> tuple[sitk.Image, float, float]:
    """A thick-slice scan at a random thickness and slab offset; returns it with both figures."""
    thickness = float(rng.uniform(*thickness_range_mm))
    offset = float(rng.uniform(0.0, thickness))
    return simulate_thick_slices(image, thickness, offset), thickness, offset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("training/data/manifest.csv"))
    parser.add_argument("--out", type=Path, default=Path("training/data/thick"))
    parser.add_argument("--per-case", type=int, default=4, help="thick-slice versions per case")
    parser.add_argument("--min-mm", type=float, default=3.0)
    parser.add_argument("--max-mm", type=float, default=7.0)
    parser.add_argument("--split", default="train", help="simulate the cases of this split only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with open(args.manifest, newline="") as handle:
        cases = [row for row in csv.DictReader(handle) if row.get("split", "train") == args.split]
    args.out.mkdir(parents=True, exist_ok=True)
    source_dir = args.manifest.resolve().parent
    rows, simulation = [], []
    for case_index, case in enumerate(cases):
        image = sitk.ReadImage(str(source_dir / case["image"]), sitk.sitkFloat32)
        rng = np.random.default_rng([args.seed, case_index])
        for version in range(args.per_case):
            thick, thickness, offset = random_thick_slices(image, rng, (args.min_mm, args.max_mm))
            name = f"{case['case']}-thick{version}"
            path = args.out / f"{name}.nii.gz"
            with common.atomic_path(path) as temporary:
                sitk.WriteImage(thick, str(temporary), useCompression=True)
            row = dict(case)
            for column in PATH_COLUMNS:
                if row.get(column):
                    row[column] = os.path.relpath(source_dir / row[column], args.out.resolve())
            row.update(case=name, thick=path.name)
            rows.append(row)
            simulation.append({"case": name, "thickness_mm": f"{thickness:.3f}",
                               "offset_mm": f"{offset:.3f}"})
        print(f"{case['case']}: {args.per_case} thick-slice versions", flush=True)
    common.write_csv(args.out / "simulation.csv", simulation)
    common.write_csv(args.out / "manifest.csv", rows)
    print(f"wrote {len(rows)} rows to {args.out / 'manifest.csv'}")


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
