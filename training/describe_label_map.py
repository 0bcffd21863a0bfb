"""Describe every label of a label map: volume, pieces, position, extent, symmetry, neighbours.

The released `brainldm-vcm-semantics` VCM takes 8 labels that its authors never named; this
prints the evidence from which the README's names for them were inferred (run it on the
reference's example condition, `data/I-demo/new_semantics.nii.gz` of github.com/Ahn-Ssu/VCM),
and describes any other label map the same way.

    python training/describe_label_map.py new_semantics.nii.gz
    python training/describe_label_map.py new_semantics.nii.gz --json
    python training/describe_label_map.py new_semantics.nii.gz --box=20:30,-35:-15,-108:-96

Positions are in RAS millimetres (x toward the right, y anterior, z superior). The midline is
the left-right centre of all labelled voxels; "x from midline" is a label's centroid relative to
it, "left/right" the share of its voxels on either side; the largest pieces (connected
components) show pairs of left and right structures. "Depth" is the mean distance of its
voxels to its own boundary (a thin shell has a small depth). "Neighbours" is the share of the
label's boundary faces (6-connected) that each other value, 0 being background, is on.
`--box=XMIN:XMAX,YMIN:YMAX,ZMIN:ZMAX` (RAS mm, repeatable; with "=" so that a leading minus is
not read as a flag) counts the values inside a box: what a region between structures is labelled as.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.volumes import read_segmentation


def describe(labelmap: sitk.Image) -> list[dict]:
    """One dict per non-zero value of `labelmap`, in value order (see the module docstring)."""
    array = sitk.GetArrayFromImage(labelmap).transpose(2, 1, 0)  # [i, j, k]
    voxel_ml = float(np.prod(labelmap.GetSpacing())) / 1000.0
    lps_of_index = np.array(labelmap.GetDirection()).reshape(3, 3) * np.array(labelmap.GetSpacing())
    to_ras = np.diag([-1.0, -1.0, 1.0])

    def ras(indices: np.ndarray) -> np.ndarray:
        return (indices @ lps_of_index.T + np.array(labelmap.GetOrigin())) @ to_ras.T

    midline = float(ras(np.argwhere(array != 0))[:, 0].mean())
    rows = []
    for value in (int(v) for v in np.unique(array) if v != 0):
        inside = array == value
        points = ras(np.argwhere(inside))
        pieces, count = ndimage.label(inside)
        sizes = np.bincount(pieces.ravel())[1:]
        largest = np.argsort(sizes, kind="stable")[::-1][:3] + 1
        depth = ndimage.distance_transform_edt(inside, sampling=labelmap.GetSpacing())
        rows.append({
            "value": value,
            "voxels": int(inside.sum()),
            "volume_ml": round(float(inside.sum()) * voxel_ml, 2),
            "pieces": int(count),
            "largest_pieces": [
                {"volume_ml": round(float(sizes[piece - 1]) * voxel_ml, 2),
                 "centroid_ras_mm": [round(float(c), 1)
                                     for c in ras(np.argwhere(pieces == piece)).mean(axis=0)]}
                for piece in largest],
            "centroid_ras_mm": [round(float(c), 1) for c in points.mean(axis=0)],
            "midline_x_mm": round(midline, 1),
            "x_from_midline_mm": round(float(points[:, 0].mean()) - midline, 1),
            "extent_ras_mm": [[round(float(low), 1), round(float(high), 1)]
                              for low, high in zip(points.min(axis=0), points.max(axis=0), strict=True)],
            "left_right": [round(float((points[:, 0] < midline).mean()), 3),
                           round(float((points[:, 0] > midline).mean()), 3)],
            "depth_mm": round(float(depth[inside].mean()), 2),
            "neighbours": _neighbours(array, value),
        })
    return rows


def values_in_box(labelmap: sitk.Image, box: list[tuple[float, float]]) -> dict[int, int]:
    """Voxel count of each value whose voxel centre lies in the RAS box [(x0, x1), (y0, y1), (z0, z1)]."""
    array = sitk.GetArrayFromImage(labelmap).transpose(2, 1, 0)
    indices = np.indices(array.shape).reshape(3, -1).T
    lps_of_index = np.array(labelmap.GetDirection()).reshape(3, 3) * np.array(labelmap.GetSpacing())
    ras = (indices @ lps_of_index.T + np.array(labelmap.GetOrigin())) * np.array([-1.0, -1.0, 1.0])
    inside = np.all([(ras[:, axis] >= low) & (ras[:, axis] <= high) for axis, (low, high) in enumerate(box)],
                    axis=0)
    values, counts = np.unique(array.reshape(-1)[inside], return_counts=True)
    return {int(value): int(count) for value, count in zip(values, counts, strict=True)}


def box_argument(text: str) -> list[tuple[float, float]]:
    try:
        box = [tuple(float(end) for end in span.split(":")) for span in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 3 or any(len(span) != 2 or span[0] > span[1] for span in box):
        raise argparse.ArgumentTypeError(f"takes XMIN:XMAX,YMIN:YMAX,ZMIN:ZMAX in mm, got '{text}'")
    return box


def _neighbours(array: np.ndarray, value: int) -> dict[int, float]:
    """Share of the boundary faces of `value`'s voxels that each other value lies across
    (outside the array counts as background)."""
    padded = np.pad(array, 1)
    region = padded == value
    counts: dict[int, int] = {}
    for axis in range(3):
        for shift in (1, -1):
            across = np.roll(padded, shift, axis=axis)[region]
            for other, count in zip(*np.unique(across[across != value], return_counts=True), strict=True):
                counts[int(other)] = counts.get(int(other), 0) + int(count)
    total = sum(counts.values()) or 1
    return {value: round(count / total, 3) for value, count in sorted(counts.items())}


def format_table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        pieces = "; ".join(f"{piece['volume_ml']:g} ml at {piece['centroid_ras_mm']}"
                           for piece in row["largest_pieces"])
        extent = ", ".join(f"{low:g}..{high:g}" for low, high in row["extent_ras_mm"])
        neighbours = ", ".join(f"{value}: {share:.0%}" for value, share in row["neighbours"].items()
                               if share >= 0.005)
        lines += [
            f"label {row['value']}: {row['volume_ml']:g} ml in {row['pieces']} piece(s); "
            f"depth {row['depth_mm']:g} mm",
            f"  largest pieces: {pieces}",
            f"  centroid RAS {row['centroid_ras_mm']} mm, x from midline {row['x_from_midline_mm']:+.1f} mm, "
            f"left/right {row['left_right'][0]:.0%}/{row['left_right'][1]:.0%}",
            f"  extent x, y, z: {extent} mm",
            f"  neighbours (share of boundary faces; 0 = background): {neighbours}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labelmap", type=Path, help="label map (NIfTI, NRRD) or Slicer .seg.nrrd")
    parser.add_argument("--json", action="store_true", help="one JSON object per label")
    parser.add_argument("--box", type=box_argument, action="append", default=[],
                        metavar="XMIN:XMAX,YMIN:YMAX,ZMIN:ZMAX", help="also count the values in this RAS box")
    args = parser.parse_args(argv)

    def run() -> int:
        labelmap = read_segmentation(args.labelmap).labelmap
        rows = describe(labelmap)
        print("\n".join(json.dumps(row) for row in rows) if args.json else format_table(rows))
        for box in args.box:
            counts = values_in_box(labelmap, box)
            print(json.dumps({"box": box, "values": counts}) if args.json else
                  f"box {box}: " + ", ".join(f"{value}: {count}" for value, count in counts.items()))
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
