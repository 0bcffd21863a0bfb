"""The measured `vcm-synthesis edit` example: a held-out scan whose ventricles are grown in a region.

Takes a case's T1 as the scan and its tissue map as the original segmentation, grows CSF (label 1)
by `--grow` voxels inside a sphere around the ventricles, runs `vcm-synthesis edit` and, for the
time, `vcm-synthesis synthesize` of the same edited segmentation, and measures what issue 14
asks of an edit:

- voxels farther than the margin from every edited voxel that differ from the scan (must be 0);
- the share of newly-CSF voxels that come out CSF-dark by `evaluate.tissue_classes` (the tissue
  check of `evaluate.py`: 3-class k-means inside the brain), for the edit, the scan and the full
  synthesis;
- the seam: mean |Laplacian| on the blend shell (edited voxels excluded, up to the margin) of the
  output over the same of the scan;
- wall time of the edit against the full synthesis (both CLI processes, model load included).

It writes the inputs and outputs under `--out`, a PNG (before, after, difference) and prints a
Markdown table.

    python training/prepare_demo_data.py --out training/data --only heldout
    python training/edit_example.py --data training/data/heldout/recipe --out /tmp/edit-example --cases 6 \\
        --png VCMSynthesis/Resources/Images/edit_example.png

(The held-out sets are subjects the demo models never saw.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import SimpleITK as sitk
from evaluate import tissue_classes
from scipy import ndimage
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.edit import DEFAULT_MARGIN_MM, distance_mm

CSF = 1


def grown_ventricles(labels: np.ndarray, grow: int, radius_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """(edited labels, the sphere the growth was confined to): CSF dilated by `grow` voxels.

    The sphere is centred on the largest CSF component nearest the brain's centre (the lateral
    ventricles of the demo cases); only grey or white matter voxels inside it become CSF.
    """
    components, count = ndimage.label(labels == CSF)
    sizes = ndimage.sum_labels(np.ones_like(labels), components, index=np.arange(1, count + 1))
    brain_centre = np.array(ndimage.center_of_mass(labels > 0))
    centres = np.array(ndimage.center_of_mass(labels == CSF, components, np.arange(1, count + 1)))
    score = sizes / (1.0 + np.linalg.norm(centres - brain_centre, axis=1))
    centre = centres[int(np.argmax(score))]
    sphere = np.linalg.norm(np.indices(labels.shape).transpose(1, 2, 3, 0) - centre, axis=-1) <= radius_vox
    dilated = ndimage.binary_dilation(labels == CSF, iterations=grow)
    new_csf = dilated & sphere & np.isin(labels, (2, 3))
    edited = labels.copy()
    edited[new_csf] = CSF
    return edited, sphere


def mean_abs_laplacian(image: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(ndimage.laplace(image.astype(np.float64)))[where].mean())


def run_cli(arguments: list) -> tuple[dict, float]:
    """`python -m VCMSynthesisLib ARGUMENTS --progress json`: (its result line, wall seconds)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "VCMSynthesisLib", *map(str, arguments), "--progress", "json"]
    process = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO_ROOT / "VCMSynthesis")
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0:
        raise SystemExit(f"{arguments[0]} failed: {process.stderr.strip().splitlines()[-1]}")
    return lines[-1], seconds


def write_figure(path: Path, scan: np.ndarray, edited_image: np.ndarray, original: np.ndarray,
                 edited: np.ndarray, blended: np.ndarray) -> None:
    """Before, after and difference on the axial and coronal slices through the edit's centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [int(round(c)) for c in ndimage.center_of_mass(edited != original)]
    difference = edited_image.astype(np.float64) - scan
    limit = float(np.abs(difference).max()) or 1.0
    figure, axes = plt.subplots(2, 3, figsize=(9, 6.4), dpi=80)
    for row, (name, take) in enumerate((("axial", lambda a: a[centre[0]]),
                                        ("coronal", lambda a: a[:, centre[1]]))):
        panels = (("before (scan)", take(scan), "gray", (0, float(scan.max()))),
                  ("after (edit)", take(edited_image), "gray", (0, float(scan.max()))),
                  ("after - before", take(difference), "coolwarm", (-limit, limit)))
        for column, (title, image, colours, (low, high)) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(image, cmap=colours, vmin=low, vmax=high, origin="lower")
            if column == 0:
                axis.contour(take(edited != original), levels=[0.5], colors="yellow", linewidths=0.6)
            axis.contour(take(blended), levels=[0.5], colors="cyan", linewidths=0.4)
            axis.set_title(f"{title}, {name}", fontsize=9)
            axis.set_axis_off()
    figure.suptitle("vcm-synthesis edit: CSF grown (yellow: edited voxels, cyan: edge of the margin)",
                    fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def measure_case(args: argparse.Namespace, case: common.Case, png: Path | None) -> list[dict]:
    """Edit one case (and synthesize it in full): one row of measures per image."""
    scan_path, original_path = case.files["image"], case.files["labels"]
    scan_image = sitk.ReadImage(str(scan_path))
    scan = sitk.GetArrayFromImage(scan_image)
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(original_path)))
    edited, _ = grown_ventricles(original, args.grow, args.radius_mm / min(scan_image.GetSpacing()))
    folder = args.out / case.name
    folder.mkdir(parents=True, exist_ok=True)
    edited_path = folder / "edited_labels.nii.gz"
    edited_image = sitk.GetImageFromArray(edited)
    edited_image.CopyInformation(scan_image)
    with common.atomic_path(edited_path) as temporary:
        sitk.WriteImage(edited_image, str(temporary), useCompression=True)

    output = folder / "edited_t1.nii.gz"
    extra = ["--seed", args.seed, "--device", args.device] + (["--steps", args.steps] if args.steps else [])
    result, edit_s = run_cli(["edit", "--model", args.model, "--image", scan_path,
                              "--segmentation", edited_path, "--original-segmentation", original_path,
                              "--output", output, "--margin-mm", args.margin_mm, "--resample", args.resample,
                              "--samples", args.samples, *extra])
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    images = {"scan (before)": (scan, None, None), "edit": (after, edit_s, result["timings"].get("edit_s"))}
    if not args.no_synthesis:
        synthesis_path = folder / "synthesized_t1.nii.gz"
        synthesis, synthesize_s = run_cli(["synthesize", "--model", args.model, "--segmentation", edited_path,
                                           "--output", synthesis_path, *extra])
        images["full synthesis"] = (sitk.GetArrayFromImage(sitk.ReadImage(str(synthesis_path))), synthesize_s,
                                    synthesis["timings"].get("sampling_s"))

    changed = edited != original
    distance = distance_mm(changed, scan_image.GetSpacing())
    far = distance > args.margin_mm
    shell = (distance > 0) & (distance <= args.margin_mm)
    brain = edited > 0
    scan_laplacian = mean_abs_laplacian(scan, shell)
    rows = []
    for name, (image, wall, sampling) in images.items():
        rows.append({"case": case.name, "image": name, "new CSF": int(changed.sum()),
                     "CSF-dark": float((tissue_classes(image, brain)[changed] == CSF).mean()),
                     "differ beyond margin": int((image[far] != scan[far]).sum()),
                     "seam": mean_abs_laplacian(image, shell) / scan_laplacian,
                     "wall_s": wall, "sampling_s": sampling})
    if png is not None:
        write_figure(png, scan, after, original, edited, distance <= args.margin_mm)
    return rows


def _cell(value, digits=2) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with manifest.csv (prepare_demo_data.py)")
    parser.add_argument("--cases", type=int, default=4, help="how many test cases to edit (the first N)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the inputs and outputs")
    parser.add_argument("--png", type=Path, required=True, help="figure of the first case to write")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--grow", type=int, default=2, help="voxels to grow the CSF by")
    parser.add_argument("--radius-mm", type=float, default=24.0, help="radius of the sphere grown in")
    parser.add_argument("--margin-mm", type=float, default=DEFAULT_MARGIN_MM)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--resample", type=int, default=1)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-synthesis", action="store_true", help="skip the full synthesis (its time)")
    args = parser.parse_args(argv)
    args.data, args.out, args.png = args.data.resolve(), args.out.resolve(), args.png.resolve()

    cases = common.read_manifest(args.data / "manifest.csv", split="test")[:args.cases]
    rows = []
    for index, case in enumerate(cases):
        rows += measure_case(args, case, args.png if index == 0 else None)
        print(f"{case.name}: done", file=sys.stderr, flush=True)
    columns = ("case", "image", "new CSF", "CSF-dark", "differ beyond margin", "seam", "wall_s", "sampling_s")
    print(f"grow {args.grow} voxels within {args.radius_mm:g} mm, margin {args.margin_mm:g} mm, "
          f"resample {args.resample}, samples {args.samples}, seed {args.seed}\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_cell(row[column]) for column in columns) + " |")
    print("\nmedians over the cases:\n")
    print("| image | CSF-dark | differ beyond margin (max) | seam | wall_s | sampling_s |\n"
          "|---|---|---|---|---|---|")
    for name in dict.fromkeys(row["image"] for row in rows):
        mine = [row for row in rows if row["image"] == name]

        def median(key, mine=mine):
            values = [row[key] for row in mine if row[key] is not None]
            return float(np.median(values)) if values else None

        differing = max(row["differ beyond margin"] for row in mine)
        print(f"| {name} | {100 * median('CSF-dark'):.0f} % | {differing} | {_cell(median('seam'))} "
              f"| {_cell(median('wall_s'), 1)} | {_cell(median('sampling_s'), 1)} |")
    print(f"\nwrote {args.png} ({args.png.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
