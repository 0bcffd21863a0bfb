"""`make demo`: synthesize a T1 from the shipped demo tissue map with the `demo` model.

Runs the worker CLI (`python -m VCMSynthesisLib synthesize`) twice, guided and unguided (the
frozen base alone, same seed), and writes into demo-output/ the two NRRD volumes and a PNG with
three orthogonal slices of the condition, the guided result and the unguided sample. Prints the
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


def preview(volumes: dict[str, np.ndarray], path: Path) -> None:
    """Three orthogonal slices through the brain's centre for each volume (one row each), as PNG."""
    labels = next(iter(volumes.values()))
    centre = [int(np.mean(axis)) for axis in np.nonzero(labels)]
    figure, axes = plt.subplots(len(volumes), 3, figsize=(9, 3 * len(volumes)))
    for row, (title, volume) in enumerate(volumes.items()):
        slices = [volume[centre[0]], volume[:, centre[1]], volume[:, :, centre[2]]]
        for column, image in enumerate(slices):
            axes[row, column].imshow(image, cmap="viridis" if row == 0 else "gray", origin="lower")
            axes[row, column].set_axis_off()
        axes[row, 0].set_title(title, loc="left")
    figure.tight_layout()
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

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(args.labels)))
    guided = sitk.GetArrayFromImage(sitk.ReadImage(str(guided_path)))
    unguided = sitk.GetArrayFromImage(sitk.ReadImage(str(unguided_path)))
    png_path = args.out / "demo-preview.png"
    preview({"condition (tissue labels)": labels, "guided (VCM)": guided, "unguided (base model)": unguided},
            png_path)
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
