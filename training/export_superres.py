"""Export the demo-superres model: the generic adapter export plus what super-resolution adds.

`export_model.export_adapter` writes the model folder (task "superres"); this adds
`metadata.superres.thickness_mm`, the slab thicknesses the adapter was trained on (from the
training config; `vcm-synthesis superres` warns outside them), and a model card with the
super-resolution figures of `evaluate_superres.py --out`.

    python training/export_superres.py --base training/runs/demo-base \
        --adapter-run training/runs/adapter-superres --config training/configs/superres.yaml \
        --out VCMSynthesis/Resources/Models/demo-superres --steps 25 \
        --figures training/runs/eval-superres.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import common
from export_model import export_adapter, model_card
from VCMSynthesisLib import superres
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.model_config import SAMPLING_SCHEDULERS
from VCMSynthesisLib.model_folder import load_model_folder, save_model_folder
from VCMSynthesisLib.runtime import positive_int

DESCRIPTION = "isotropic 2 mm T1 brain MRI from a thick-slice T1 (axial super-resolution; demo base + VCM)"


def superres_card(config, figures: dict | None) -> str:
    """The generic model card, the thick-slice simulation, and the super-resolution figures."""
    low, high = config.metadata["superres"]["thickness_mm"]
    lines = [model_card(config, None).rstrip(), "", "## Super-resolution", "",
             f"Condition: a thick-slice T1 with contiguous slabs {low:g}-{high:g} mm thick (random",
             "thickness and slab offset per training pair, 4 pairs per subject), simulated as slab",
             "averages of the true 2 mm volume along the axial axis (`training/simulate_thick_slices.py`).",
             "At inference each sample is calibrated on the acquired slabs and made consistent with them",
             "(back-projection; voxels below the darkest slab are raised to it), and the CLI averages",
             f"{superres.DEFAULT_SAMPLES} samples by default. Oblique scans are resampled onto the model's",
             "axial grid; the model saw only axial slabs."]
    if figures:
        lines += ["", f"### Figures ({figures['heading']}; `training/evaluate_superres.py`)", "",
                  figures["table"], "", f"Command: `{figures['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="base-only model folder (frozen base)")
    parser.add_argument("--adapter-run", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("training/configs/superres.yaml"))
    parser.add_argument("--out", type=Path, default=Path("VCMSynthesis/Resources/Models/demo-superres"))
    parser.add_argument("--name", default="demo-superres")
    parser.add_argument("--steps", type=positive_int, help="default sampling steps of the exported model")
    parser.add_argument("--scheduler", choices=SAMPLING_SCHEDULERS,
                        help="default sampler of the exported model (default: the base's)")
    parser.add_argument("--figures", type=Path, help="evaluation JSON (evaluate_superres.py --out) to quote")
    args = parser.parse_args(argv)

    training_config = common.load_config(args.config)
    folder = export_adapter(args.base, args.adapter_run, args.out, args.name, "superres", DESCRIPTION,
                            None, args.steps, args.scheduler)
    model = load_model_folder(folder)
    superres = {"thickness_mm": [float(v) for v in training_config["superres"]["thickness_mm"]]}
    config = dataclasses.replace(model.config, metadata={**model.config.metadata, "superres": superres})
    figures = json.loads(args.figures.read_text()) if args.figures else None
    save_model_folder(folder, config, model.autoencoder, model.diffusion, model.adapter,
                      model_card=superres_card(config, figures))
    print(f"wrote {folder}")


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
