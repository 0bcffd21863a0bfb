"""Evaluate synthesis models on held-out sets: tissue Dice, PSNR and SSIM, guided against unguided.

Tissue Dice checks that a synthesized T1 follows its condition without trusting the model: a
k-means classifier (3 clusters of the intensities inside the brain, sorted by mean intensity:
CSF < grey < white matter in T1) labels the image, and the labels are compared with the tissue
map. PSNR and SSIM (MONAI metrics) compare with the true T1 inside the brain. For translation
models the no-learning baseline is histogram matching of the T2-like image to a training T1.

By default every held-out set that `prepare_demo_data.py` writes is measured and reported side by
side: a set drawn with the training recipe hides exactly the failures users meet (another brain,
other grids, stronger deformations).

    python training/evaluate.py --model demo --cases 6
    python training/evaluate.py --model demo-t2-to-t1 --sets training/data/heldout/recipe
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import common
import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from sklearn.cluster import KMeans
from VCMSynthesisLib import conditions, sampler, volumes
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import SAMPLING_SCHEDULERS
from VCMSynthesisLib.model_folder import LoadedModel, load_model_folder
from VCMSynthesisLib.registry import resolve_model

TISSUES = {1: "CSF", 2: "grey matter", 3: "white matter"}
HELDOUT = common.REPO_ROOT / "training" / "data" / "heldout"


def tissue_classes(image: np.ndarray, brain: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels 1..3 inside `brain` from 3-cluster k-means on intensities, ordered by cluster mean."""
    values = image[brain].reshape(-1, 1).astype(np.float64)
    kmeans = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(values)
    rank = np.argsort(np.argsort(kmeans.cluster_centers_.ravel()))
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[brain] = rank[kmeans.labels_] + 1
    return labels


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels=tuple(TISSUES)) -> dict[int, float]:
    """Dice of each label value (1.0 where both maps lack the label)."""
    scores = {}
    for label in labels:
        a, b = prediction == label, reference == label
        total = a.sum() + b.sum()
        scores[label] = 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)
    return scores


def tissue_dice(image: np.ndarray, tissue_map: np.ndarray) -> dict[str, float]:
    """Per-tissue and mean Dice of the k-means tissues of `image` against `tissue_map` (0 = outside)."""
    scores = dice_per_label(tissue_classes(image, tissue_map > 0), tissue_map)
    named = {TISSUES[label]: score for label, score in scores.items()}
    return {**named, "mean": float(np.mean(list(scores.values())))}


def masked_psnr_ssim(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR over the voxels of `mask` and SSIM over its bounding box, data range = the truth's there."""
    truth_inside = truth[mask]
    data_range = float(truth_inside.max() - truth_inside.min())
    psnr = PSNRMetric(max_val=data_range)(torch.as_tensor(estimate[mask], dtype=torch.float32)[None],
                                           torch.as_tensor(truth_inside, dtype=torch.float32)[None])
    box = tuple(slice(axis.min(), axis.max() + 1) for axis in np.nonzero(mask))
    volumes_in_box = [torch.as_tensor(np.ascontiguousarray(v[box]), dtype=torch.float32)[None, None]
                      for v in (estimate, truth)]
    ssim = SSIMMetric(spatial_dims=3, data_range=data_range)(*volumes_in_box)
    return {"psnr": float(psnr.item()), "ssim": float(ssim.item())}


def histogram_matching(source: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The no-learning translation baseline: `source` intensities mapped onto `reference`'s histogram."""
    return sitk.HistogramMatching(sitk.Cast(source, sitk.sitkFloat32), sitk.Cast(reference, sitk.sitkFloat32),
                                  numberOfHistogramLevels=256, numberOfMatchPoints=15,
                                  thresholdAtMeanIntensity=True)


def case_conditions(model: LoadedModel, case: common.Case, keys: dict[str, str]) -> conditions.Conditions:
    """A case's condition channels built as the worker builds them.

    A base model (no adapter, so no conditions) gets none, on the grid a labels model would place
    on this case: its autoencoder ceiling and unguided samples are still measured.
    """
    if model.adapter is None:
        reference = sitk.ReadImage(str(case.files[keys["labels"]]))
        content = sitk.GetArrayViewFromImage(reference) > 0
        return conditions.Conditions(channels=np.zeros((0, *model.config.grid.size), np.float32),
                                     grid=conditions.model_grid_for(reference, model.config.grid, content),
                                     reference=reference)
    segmentation = volumes.read_segmentation(case.files[keys["labels"]]) if model.config.labels else None
    modalities = {modality.name: volumes.read_volume(case.files[keys[modality.name]])
                  for modality in model.config.modalities}
    return conditions.assemble_conditions(model.config, segmentation, modalities)


def synthesize(model: LoadedModel, built: conditions.Conditions, guided: bool, steps: int | None,
               seed: int, strength: float | None = None,
               scheduler: str | None = None) -> tuple[np.ndarray, float]:
    """(image on the case's reference grid in SimpleITK order, seconds)."""
    start = time.perf_counter()
    condition = torch.from_numpy(built.channels)[None] if len(built.channels) else None
    image = sampler.sample(model, condition, steps=steps, seed=seed, guided=guided, strength=strength,
                           scheduler=scheduler)
    on_reference = built.synthesized_to_reference(image[0, 0].numpy(), model.config)
    return sitk.GetArrayFromImage(on_reference), time.perf_counter() - start


def autoencoder_reconstruction(model: LoadedModel, built: conditions.Conditions,
                               image: sitk.Image) -> np.ndarray:
    """The true image through the model's autoencoder (latent mean): the best a synthesis can decode."""
    on_grid = conditions.array_from_image(conditions.resample_to_grid(image, built.grid, labels=False))
    with torch.inference_mode():
        latent = model.autoencoder.encode(torch.from_numpy(on_grid)[None, None].to(model.device))[0]
        decoded = model.autoencoder.decode(latent)[0, 0].clamp(*model.config.intensity_range).cpu().numpy()
    on_reference = built.to_reference(decoded, default_value=model.config.intensity_range[0])
    return sitk.GetArrayFromImage(on_reference)


def evaluate_case(model: LoadedModel, case: common.Case, keys: dict[str, str], steps: int | None,
                  seed: int, baseline_reference: sitk.Image | None, strength: float | None = None,
                  guided_only: bool = False, scheduler: str | None = None) -> list[dict]:
    """One row per method (true T1, its autoencoder reconstruction, guided unless a base model,
    unguided, baseline; only the guided sample with `guided_only`)."""
    tissue_map = sitk.GetArrayFromImage(sitk.ReadImage(str(case.files[keys["labels"]])))
    truth_image = sitk.ReadImage(str(case.files[keys["image"]]), sitk.sitkFloat32)
    truth = sitk.GetArrayFromImage(truth_image)
    brain = tissue_map > 0
    built = case_conditions(model, case, keys)
    estimates = {}
    if not guided_only:
        estimates["true T1"] = (truth, 0.0)
        estimates["autoencoder (ceiling)"] = (autoencoder_reconstruction(model, built, truth_image), 0.0)
    if model.adapter is not None:
        estimates["guided"] = synthesize(model, built, True, steps, seed, strength, scheduler)
    if not guided_only:
        estimates["unguided"] = synthesize(model, built, False, steps, seed, scheduler=scheduler)
    if baseline_reference is not None and not guided_only:
        t2 = sitk.ReadImage(str(case.files[keys["T2"]]), sitk.sitkFloat32)
        estimates["histogram matching"] = (sitk.GetArrayFromImage(histogram_matching(t2, baseline_reference)),
                                           0.0)
    rows = []
    for method, (array, seconds) in estimates.items():
        dice = tissue_dice(array, tissue_map)
        held_out_set = case.files[keys["labels"]].parent.parent.name
        rows.append({"set": held_out_set, "case": case.name, "method": method,
                     **{f"dice {k}": v for k, v in dice.items()},
                     **masked_psnr_ssim(array, truth, brain), "seconds": seconds})
    return rows


def median_table(rows: list[dict]) -> str:
    """Medians per method as a Markdown table."""
    columns = [key for key in rows[0] if key not in ("set", "case", "method")]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in dict.fromkeys(row["method"] for row in rows):
        chosen = [row for row in rows if row["method"] == method]
        medians = [f"{np.median([row[column] for row in chosen]):.3f}" for column in columns]
        lines.append(f"| {method} | " + " | ".join(medians) + " |")
    return "\n".join(lines)


def sets_table(rows: list[dict]) -> str:
    """Median mean tissue Dice per held-out set (rows) and method (columns), guided PSNR / SSIM."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    lines = ["| held-out set | " + " | ".join(f"Dice {m}" for m in methods) + " | PSNR / SSIM guided |",
             "|---" * (len(methods) + 2) + "|"]
    for name in dict.fromkeys(row["set"] for row in rows):
        chosen = [row for row in rows if row["set"] == name]

        def median(method, column, chosen=chosen):
            values = [row[column] for row in chosen if row["method"] == method]
            return np.median(values) if values else float("nan")
        dice = " | ".join(f"{median(m, 'dice mean'):.3f}" for m in methods)
        lines.append(f"| {name} | {dice} | {median('guided', 'psnr'):.2f} / {median('guided', 'ssim'):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = common.evaluation_arguments(__doc__.splitlines()[0], "demo")
    parser.set_defaults(manifest=None)
    parser.add_argument("--sets", nargs="+", type=Path,
                        help="held-out manifests or folders (default: --manifest if given, else every folder "
                             "of training/data/heldout)")
    parser.add_argument("--strength", type=float, help="condition strength (default: the model's)")
    parser.add_argument("--guided-only", action="store_true", help="only the guided sample (for tuning)")
    parser.add_argument("--scheduler", choices=SAMPLING_SCHEDULERS, help="sampler (default: the model's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = args.sets or ([args.manifest] if args.manifest else sorted(
        path.parent for path in HELDOUT.glob("*/manifest.csv")))
    if not sets:
        raise UserError(f"no held-out sets in {HELDOUT}; run training/prepare_demo_data.py or pass --sets")

    model = load_model_folder(resolve_model(args.model))
    keys = {"image": "image", "labels": "labels", "T2": "t2"}
    baseline_reference = None
    if model.config.modalities:
        first_training_case = common.read_manifest(HELDOUT.parent / "manifest.csv", split="train")[0]
        baseline_reference = sitk.ReadImage(str(first_training_case.files["image"]), sitk.sitkFloat32)
    rows = []
    tables = {}
    for manifest in sets:
        set_rows = []
        for case in common.read_manifest(manifest, split=args.split)[: args.cases]:
            case_rows = evaluate_case(model, case, keys, args.steps, args.seed, baseline_reference,
                                      args.strength, args.guided_only, args.scheduler)
            for row in case_rows:
                print(f"{row['case']} {row['method']}: Dice {row['dice mean']:.3f}, PSNR {row['psnr']:.2f}, "
                      f"SSIM {row['ssim']:.3f}, {row['seconds']:.1f} s", flush=True)
            set_rows += case_rows
        tables[set_rows[0]["set"]] = median_table(set_rows)
        print(f"\nMedians, set {set_rows[0]['set']}, model {args.model}:\n\n{tables[set_rows[0]['set']]}\n")
        rows += set_rows
    summary = sets_table(rows)
    print(f"Median tissue Dice per held-out set, model {args.model}:\n\n{summary}")
    if args.out is not None:
        common.write_json(args.out, {"model": str(args.model), "rows": rows, "tables": tables,
                                     "table": summary,
                                     "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
