"""Write model folders (`config.json` + safetensors + model card) from training runs.

`base` makes a base-only model (adapter null) from an autoencoder run and a diffusion run: the
frozen base that `train_adapter.py` takes. `adapter` adds a trained adapter run to a base model
folder and writes the complete model, with a model card listing data, training and figures.
`set-sampling` changes an exported model's default sampler, steps, strength or background value
(and its card) in place.

    python training/export_model.py base --autoencoder-run training/runs/autoencoder \
        --diffusion-run training/runs/diffusion --out training/runs/demo-base
    python training/export_model.py adapter --base training/runs/demo-base \
        --adapter-run training/runs/adapter-labels --out VCMSynthesis/Resources/Models/demo \
        --name demo --task synthesis --description "..." --figures training/runs/eval-demo.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import common
from monai.networks.nets import DiffusionModelUNet
from safetensors.torch import load_file
from train_adapter import ADAPTER_WEIGHTS, adapter_model_config
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import SAMPLING_SCHEDULERS, ModelConfig
from VCMSynthesisLib.model_folder import load_model_folder, save_model_folder
from VCMSynthesisLib.networks import VCM
from VCMSynthesisLib.runtime import positive_int


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Steps (from the checkpoint: a run stopped by `max_minutes` may end between log rows), wall
    minutes and last logged loss of a run, counting the runs it began from (`init_from`) as stages."""
    rows = common.read_log(run_dir)
    step = common.checkpoint_step(run_dir)
    summary = {"steps": step if step is not None else int(rows[-1]["step"]),
               "minutes": round(rows[-1]["minutes"], 1), "final_loss": round(rows[-1]["loss"], 5)}
    origin = run_dir / common.INIT_FROM_NAME
    if not origin.is_file():
        return summary
    earlier = run_summary(Path(read_json(origin)["init_from"]))
    stages = [*earlier.pop("stages", [earlier]), summary]
    return {"steps": sum(stage["steps"] for stage in stages),
            "minutes": round(sum(stage["minutes"] for stage in stages), 1),
            "final_loss": summary["final_loss"], "stages": stages}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing; finish that training run first")
    return json.loads(path.read_text())


def export_base(autoencoder_run: Path, diffusion_run: Path, out: Path, name: str) -> Path:
    """A base-only model folder from the two base runs."""
    autoencoder, autoencoder_params = common.load_autoencoder(autoencoder_run)
    diffusion_info = read_json(diffusion_run / "diffusion.json")
    diffusion = DiffusionModelUNet(**diffusion_info["params"])
    diffusion.load_state_dict(load_file(str(diffusion_run / "diffusion.safetensors")))
    schedule = diffusion_info["scheduler"]
    config = ModelConfig.from_dict({
        "format_version": 1, "name": name, "task": "synthesis",
        "description": "demo base model: unconditional 2 mm T1 brain MRI (no adapter)",
        # The demo data are skull-stripped: 0 outside the brain (`intensity.background`).
        "grid": diffusion_info["grid"], "intensity": {"range": [0.0, 1.0], "background": 0.0},
        "autoencoder": {"weights": "autoencoder.safetensors", "params": autoencoder_params},
        "diffusion": {"weights": "diffusion.safetensors", "params": diffusion_info["params"],
                      "covariates": None},
        "adapter": None,
        "latent": {"channels": autoencoder_params["latent_channels"],
                   "scale_factor": diffusion_info["scale_factor"]},
        "scheduler": schedule, "sampling": {"scheduler": "ddim", "steps": 25},
        "conditions": {"labels": None, "modalities": []},
        "metadata": {"training": {"autoencoder": run_summary(autoencoder_run),
                                  "diffusion": run_summary(diffusion_run)}},
    }, source="base export")
    return save_model_folder(out, config, autoencoder, diffusion)


def model_card(config: ModelConfig, figures: dict[str, Any] | None) -> str:
    """README.md of a shipped model: what it does, data, training, measured figures."""
    training = config.metadata.get("training", {})
    lines = [f"# {config.name}", "", config.description, "",
             f"- Task: {config.task}; conditions: {', '.join(config.condition_channel_names)}",
             f"- Grid: {list(config.grid.size)} voxels at {list(config.grid.spacing)} mm "
             f"({config.grid.orientation}), intensities in {list(config.intensity_range)}",
             f"- Default sampling: {SAMPLING_SCHEDULERS[config.sampling_scheduler]}, "
             f"{config.sampling_steps} steps, "
             f"condition strength {config.sampling_strength:g}", "",
             "## Data", "",
             "Trained on subjects made from the MNI ICBM152 2009 template (nilearn's copy) by random",
             "deformations, label edits and resampling at 2 mm (`training/prepare_demo_data.py`); tissue",
             "labels from the template's grey and white matter maps (CSF = brain mask minus both). The",
             "T2-weighted-like contrast is SIMULATED from the tissue maps. Evaluated on held-out sets that",
             "differ from training, Colin27 (a brain never trained on) among them. A demonstration model,",
             "not for clinical or research use. Template copyright:",
             "`Resources/SampleData/MNI-ICBM152-COPYRIGHT.txt`.", "",
             "## Training (on 2 shared CPU cores)", ""]
    for part, summary in training.items():
        origin = summary.get("continued_from")
        digest = summary.get("continued_from_sha256")
        continued = (f" (continued from `{origin}`" + (f", sha256 {digest[:16]}" if digest else "") + ")"
                     if origin else "")
        stages = summary.get("stages")
        staged = f" ({' + '.join(str(stage['steps']) for stage in stages)})" if stages else ""
        lines.append(f"- {part}: {summary['steps']} steps{staged}, {summary['minutes']} min, final loss "
                     f"{summary['final_loss']}{continued}")
    if figures:
        lines += ["", "## Figures (held-out sets, medians; `training/evaluate.py`)", "",
                  figures["table"], "", f"Command: `{figures['command']}`"]
    return "\n".join(lines) + "\n"


def with_sampling(config_dict: dict[str, Any], steps: int | None, scheduler: str | None,
                  strength: float | None = None, background: float | None = None) -> dict[str, Any]:
    """`config_dict` with its default sampling steps, scheduler and strength, and its background
    value (`intensity.background`), replaced where given."""
    sampling = dict(config_dict["sampling"])
    for key, value in (("steps", steps), ("scheduler", scheduler), ("strength", strength)):
        if value is not None:
            sampling[key] = value
    intensity = dict(config_dict["intensity"])
    if background is not None:
        intensity["background"] = background
    return {**config_dict, "sampling": sampling, "intensity": intensity}


def export_adapter(base_folder: Path, adapter_run: Path, out: Path, name: str, task: str, description: str,
                   figures: Path | None, steps: int | None, scheduler: str | None = None,
                   strength: float | None = None) -> Path:
    """The complete model: base networks, the trained adapter, conditions and a model card.

    `steps`, `scheduler` and `strength` set the model's default sampling (else the base's): which
    one serves an adapter best is measured with `training/evaluate.py`, so it belongs to the model.
    """
    base = load_model_folder(base_folder)
    info = read_json(adapter_run / "adapter.json")
    config = adapter_model_config(base.config, info, name, task, description)
    adapter = VCM(**config.adapter.params)
    adapter.load_state_dict(load_file(str(adapter_run / ADAPTER_WEIGHTS)))
    summary = {**run_summary(adapter_run), "cases": info["cases"]}
    if info.get("init_adapter"):
        summary["continued_from"] = info["init_adapter"]
        summary["continued_from_sha256"] = info.get("init_adapter_sha256")
    metadata = {"training": {**base.config.metadata.get("training", {}), "adapter": summary}}
    config_dict = {**config.to_dict(), "metadata": metadata}
    config = ModelConfig.from_dict(with_sampling(config_dict, steps, scheduler, strength),
                                   source="adapter export")
    figures_data = json.loads(figures.read_text()) if figures else None
    return save_model_folder(out, config, base.autoencoder, base.diffusion, adapter,
                             model_card=model_card(config, figures_data))


def set_sampling(folder: Path, steps: int | None, scheduler: str | None, figures: Path | None,
                 strength: float | None = None, background: float | None = None) -> Path:
    """Rewrites an exported model's default sampling and its card's figures, weights untouched
    (stored again in the type they had: the shipped ones are float16).

    For a model whose adapter run is gone, or to adopt a sampler measured better after export.
    """
    model = load_model_folder(folder)
    if model.config.task == "superres":
        raise UserError(f"{folder} is a super-resolution model; re-export it with export_superres.py")
    sampling = with_sampling(model.config.to_dict(), steps, scheduler, strength, background)
    config = ModelConfig.from_dict(sampling, source="set-sampling")
    figures_data = json.loads(figures.read_text()) if figures else None
    stored = load_file(str(folder / (config.adapter or config.diffusion).weights))
    dtype = next(tensor.dtype for tensor in stored.values() if tensor.is_floating_point())
    return save_model_folder(folder, config, model.autoencoder, model.diffusion, model.adapter,
                             model_card=model_card(config, figures_data), dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="kind", required=True)
    base = commands.add_parser("base", help="base-only model from autoencoder and diffusion runs")
    base.add_argument("--autoencoder-run", type=Path, required=True)
    base.add_argument("--diffusion-run", type=Path, required=True)
    base.add_argument("--out", type=Path, required=True)
    base.add_argument("--name", default="demo-base")
    adapter = commands.add_parser("adapter", help="complete model from a base folder and an adapter run")
    adapter.add_argument("--base", type=Path, required=True)
    adapter.add_argument("--adapter-run", type=Path, required=True)
    adapter.add_argument("--out", type=Path, required=True)
    adapter.add_argument("--name", required=True)
    adapter.add_argument("--task", default="synthesis")
    adapter.add_argument("--description", required=True)
    adapter.add_argument("--figures", type=Path, help="evaluation JSON (training/evaluate.py --out) to quote")
    adapter.add_argument("--steps", type=positive_int, help="default sampling steps of the exported model")
    adapter.add_argument("--scheduler", choices=SAMPLING_SCHEDULERS,
                         help="default sampler of the exported model (default: the base's)")
    adapter.add_argument("--strength", type=float, help="default condition strength (default: the base's, 1)")
    sampling = commands.add_parser("set-sampling", help="change a model folder's default sampling in place")
    sampling.add_argument("--model", type=Path, required=True, help="exported model folder")
    sampling.add_argument("--steps", type=positive_int)
    sampling.add_argument("--scheduler", choices=SAMPLING_SCHEDULERS)
    sampling.add_argument("--strength", type=float, help="default condition strength")
    sampling.add_argument("--background", type=float,
                          help="the image value outside the anatomy (0 for skull-stripped training images)")
    sampling.add_argument("--figures", type=Path, help="evaluation JSON measured with these defaults")
    args = parser.parse_args(argv)
    if args.kind == "base":
        folder = export_base(args.autoencoder_run, args.diffusion_run, args.out, args.name)
    elif args.kind == "set-sampling":
        folder = set_sampling(args.model, args.steps, args.scheduler, args.figures, args.strength,
                              args.background)
    else:
        folder = export_adapter(args.base, args.adapter_run, args.out, args.name, args.task, args.description,
                                args.figures, args.steps, args.scheduler, args.strength)
    print(f"wrote {folder}")


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
