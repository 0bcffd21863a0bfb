"""`make demo`: synthesize a T1 from the shipped demo tissue map with the `demo` model.

Runs the worker CLI (`python -m VCMSynthesisLib synthesize`) twice, guided and unguided (the
frozen base alone, same seed), and writes into demo-output/ the two NRRD volumes and a PNG with
three orthogonal slices of the condition, the guided result and the unguided sample (anatomical
letters at each panel's edges, a legend for the tissue labels). Prints the
paths, the wall time and peak memory of the guided run, and the tissue Dice of both results.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.patches
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import common  # noqa: E402
import evaluate  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from VCMSynthesisLib.cli import run_reporting_errors

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LABELS = REPO / "VCMSynthesis" / "Resources" / "SampleData" / "demo-tissue-labels.nii.gz"


def synthesize(model: str, labels: Path, output: Path, unguided: bool, seed: int) -> float:
    """Run the worker CLI; returns its wall time in seconds."""
    command = [sys.executable, "-m", "VCMSynthesisLib", "synthesize", "--model", model,
               "--segmentation", str(labels), "--output", str(output), "--seed", str(seed)]
    if unguided:
        command.append("--unguided")
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    return time.perf_counter() - start


#: Anatomical letter at the positive end of each LPS axis (ITK's world space), and at the negative end.
_LPS_POSITIVE, _LPS_NEGATIVE = "LPS", "RAI"


def axis_ends(direction: tuple[float, ...], index_axis: int) -> tuple[str, str]:
    """The anatomical letters at the low and high ends of image index axis `index_axis` (0 = i),
    from a SimpleITK direction (row-major 3 x 3, LPS): the world axis it runs closest to."""
    column = np.asarray(direction, dtype=float).reshape(3, 3)[:, index_axis]
    world = int(np.argmax(np.abs(column)))
    low, high = _LPS_NEGATIVE[world], _LPS_POSITIVE[world]
    return (low, high) if column[world] > 0 else (high, low)


def preview(volumes: dict[str, np.ndarray], direction: tuple[float, ...], path: Path) -> None:
    """Three orthogonal slices through the brain's centre for each volume (one row each), as PNG.

    The first volume is the tissue map (a legend names its labels, `evaluate.TISSUES`); every
    panel has the anatomical letters of its image axes at its edges (from `direction`, the
    volumes' common SimpleITK direction), so an oblique or flipped grid shows which way is which.
    """
    labels = next(iter(volumes.values()))
    centre = [int(np.mean(axis)) for axis in np.nonzero(labels)]
    # Arrays are [k, j, i]: each slice's (vertical, horizontal) index axes, 0 = i.
    planes = [((1, 0), lambda v: v[centre[0]]), ((2, 0), lambda v: v[:, centre[1]]),
              ((2, 1), lambda v: v[:, :, centre[2]])]
    tissue_colours = plt.get_cmap("viridis", len(evaluate.TISSUES) + 1)
    figure, axes = plt.subplots(len(volumes), 3, figsize=(9, 3 * len(volumes) + 0.6))
    for row, (title, volume) in enumerate(volumes.items()):
        for column, ((vertical, horizontal), cut) in enumerate(planes):
            axis = axes[row, column]
            if row == 0:
                axis.imshow(cut(volume), cmap=tissue_colours, vmin=-0.5, vmax=len(evaluate.TISSUES) + 0.5,
                            origin="lower", interpolation="nearest")
            else:
                axis.imshow(cut(volume), cmap="gray", origin="lower")
            axis.set_xticks([])
            axis.set_yticks([])
            left, right = axis_ends(direction, horizontal)
            bottom, top = axis_ends(direction, vertical)
            for text, x, y in ((left, 0.02, 0.5), (right, 0.98, 0.5), (bottom, 0.5, 0.02), (top, 0.5, 0.98)):
                axis.text(x, y, text, transform=axis.transAxes, color="yellow", fontsize=9, fontweight="bold",
                          ha="center", va="center")
        axes[row, 0].set_title(title, loc="left")
    patches = [matplotlib.patches.Patch(color=tissue_colours(value), label=f"{value} {name}")
               for value, name in {0: "background", **evaluate.TISSUES}.items()]
    figure.legend(handles=patches, loc="lower center", ncol=len(patches), frameon=False)
    figure.tight_layout(rect=(0, 0.6 / figure.get_figheight(), 1, 1))
    with common.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--labels", type=Path, default=SAMPLE_LABELS)
    parser.add_argument("--out", type=Path, default=REPO / "demo-output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    guided_path = args.out / "demo-t1.nrrd"
    unguided_path = args.out / "demo-t1-unguided.nrrd"
    seconds = synthesize(args.model, args.labels, guided_path, False, args.seed)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    synthesize(args.model, args.labels, unguided_path, True, args.seed)

    labels_image = sitk.ReadImage(str(args.labels))
    labels = sitk.GetArrayFromImage(labels_image)
    guided = sitk.GetArrayFromImage(sitk.ReadImage(str(guided_path)))
    unguided = sitk.GetArrayFromImage(sitk.ReadImage(str(unguided_path)))
    png_path = args.out / "demo-preview.png"
    preview({"condition (tissue labels)": labels, "guided (VCM)": guided, "unguided (base model)": unguided},
            labels_image.GetDirection(), png_path)
    print(f"condition:  {args.labels}")
    print(f"guided:     {guided_path}")
    print(f"unguided:   {unguided_path}")
    print(f"preview:    {png_path}")
    print(f"guided synthesis: {seconds:.1f} s wall (whole worker process), peak memory {peak_gb:.2f} GB")
    for name, image in (("guided", guided), ("unguided", unguided)):
        dice = evaluate.tissue_dice(image, labels)
        print(f"tissue Dice {name}: mean {dice['mean']:.3f} (CSF {dice['CSF']:.3f}, grey "
              f"{dice['grey matter']:.3f}, white {dice['white matter']:.3f})")


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
