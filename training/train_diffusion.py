"""Train the demo base model's unconditional latent diffusion model (MONAI DiffusionModelUNet).

The training images (and their left-right mirror images) are encoded once with the trained
autoencoder; the latent means, scaled to unit variance, are what the U-Net learns to denoise
(DDPM noise prediction, MSE). Writes `diffusion.safetensors` (EMA weights) and `diffusion.json`
(U-Net keyword arguments, latent scale factor, noise schedule) into the run directory.

    python training/train_diffusion.py --config training/configs/demo_diffusion.yaml \
        --run-dir training/runs/diffusion
"""

from __future__ import annotations

from pathlib import Path

import common
import SimpleITK as sitk
import torch
from monai.networks.nets import DiffusionModelUNet
from safetensors.torch import load_file, save_file
from train_autoencoder import load_images
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.model_config import NoiseSchedule
from VCMSynthesisLib.sampler import build_scheduler


def cached_latents(config: dict, run_dir: Path, device: torch.device) -> torch.Tensor:
    """Latent means of the training images and their mirror images, computed once per run."""
    path = run_dir / "latents.safetensors"
    if path.is_file():
        return load_file(str(path))["latents"]
    autoencoder, _ = common.load_autoencoder(config["autoencoder_run"])
    images = load_images(config["data"]["manifest"], config["data"].get("image_key", "image"))
    latents = common.encode_latents(autoencoder, torch.cat([images, images.flip(2)]), device)
    run_dir.mkdir(parents=True, exist_ok=True)
    with common.atomic_path(path) as temporary:
        save_file({"latents": latents.contiguous()}, str(temporary))
    return latents


def data_grid(config: dict) -> dict:
    """The grid of the training images (first case): the base model's working grid."""
    case = common.read_manifest(config["data"]["manifest"], split="train")[0]
    image = sitk.ReadImage(str(case.files[config["data"].get("image_key", "image")]))
    return {"spacing": list(image.GetSpacing()), "size": list(image.GetSize()), "orientation": "RAS"}


def main(argv: list[str] | None = None) -> None:
    config, run_dir = common.trainer_arguments(__doc__.splitlines()[0], argv)
    context = common.setup_distributed(config.get("device"))
    settings = config["training"]
    torch.manual_seed(settings["seed"])
    with common.main_rank_first(context):
        latents = cached_latents(config, Path(run_dir), context.device)
    scale_factor = float(1.0 / latents.std())
    latents = latents * scale_factor
    schedule = config["scheduler"]
    # The noise the sampler will remove: its DDPM scheduler over every training timestep.
    noise_schedule = NoiseSchedule(**schedule)
    scheduler, _ = build_scheduler(noise_schedule, "ddpm", noise_schedule.num_train_timesteps)
    params = config["diffusion"]
    model = DiffusionModelUNet(**params)

    def loss_function(module, step, generator):
        index = torch.randint(len(latents), (settings["batch_size"],), generator=generator)
        clean = latents[index].to(context.device)
        noise = torch.randn(clean.shape, generator=generator).to(context.device)
        timesteps = torch.randint(schedule["num_train_timesteps"], (len(index),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps.to(context.device))
        prediction = module(noisy, timesteps.to(context.device))
        return torch.nn.functional.mse_loss(prediction, noise), {}

    trained = common.train(model, loss_function, settings, run_dir, context, "diffusion")
    if context.is_main:
        common.save_safetensors(trained, Path(run_dir) / "diffusion.safetensors")
        common.write_json(Path(run_dir) / "diffusion.json",
                          {"params": params, "scale_factor": scale_factor, "scheduler": schedule,
                           "grid": data_grid(config)})


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
