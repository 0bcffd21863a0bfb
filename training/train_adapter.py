"""Train a VCM adapter on a frozen base model (the paper's recipe), for any condition kind.

The base is any model folder (`config.json` + weights): the demo base made by
`export_model.py base`, or BrainLDM imported with `vcm-synthesis import-reference`. Conditions
are built from the manifest's files by `VCMSynthesisLib.conditions.assemble_conditions`, exactly
as at inference; the image is resampled onto the same grid and encoded once by the frozen
autoencoder (latent means, and those of the left-right mirror images for flip augmentation).

Per step: z_t = noisy latent at a random t, eps_t = frozen base(z_t, t),
(gamma, beta) = VCM(cat(z_t, eps_t), condition, t), eps' = eps_t * (1 + gamma) + beta,
loss = MSE(eps', eps) + lambda * (|gamma|_1 + |beta|_1) with lambda = 1 / numel(gamma).
With `relative_mse: true` each sample's MSE is divided by the frozen base's on that sample: the
plain MSE is dominated by the low-noise steps, where the base is already good and a condition
that fixes only the anatomy (a label map) adds little, so such an adapter learns slowly.
With `condition_latent_weight: w` the first latent-channels of the encoded condition are also
fitted to the clean latent (+ w * MSE): the condition encoder then gets a direct signal from the
start instead of one passed back through the U-Net (for a label map that signal is weak).
Writes `adapter.safetensors` and `adapter.json` (VCM kwargs, conditions, base) to the run dir.
With `init_adapter: <adapter.safetensors>` a fresh run starts from those weights (e.g. a shipped
model's adapter, to train it further on the same base with a new learning-rate schedule).

    python training/train_adapter.py --config training/configs/demo_adapter_labels.yaml \
        --run-dir training/runs/adapter-labels
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from VCMSynthesisLib import conditions, volumes
from VCMSynthesisLib.checksums import Checksums
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import ModelConfig
from VCMSynthesisLib.model_folder import LoadedModel, load_model_folder, load_state_strict
from VCMSynthesisLib.networks import VCM, modulate
from VCMSynthesisLib.sampler import build_scheduler

ADAPTER_WEIGHTS = "adapter.safetensors"


def adapter_model_config(base: ModelConfig, config: dict[str, Any], name: str, task: str,
                         description: str) -> ModelConfig:
    """The base's config with this adapter's conditions and VCM kwargs (what inference will read)."""
    table = config["conditions"].get("labels") or []
    spec = {"format_version": 1, **base.to_dict(), "name": name, "task": task, "description": description,
            "conditions": {"labels": {"table": table} if table else None,
                           "modalities": config["conditions"].get("modalities") or []},
            "adapter": {"weights": ADAPTER_WEIGHTS, "params": adapter_params(base, config)}}
    return ModelConfig.from_dict(spec, source="adapter config")


def adapter_params(base: ModelConfig, config: dict[str, Any]) -> dict[str, Any]:
    """VCM kwargs: the config's, with the latent and condition channels the base and conditions fix."""
    wanted = config["conditions"]
    channels = len(wanted.get("labels") or []) + len(wanted.get("modalities") or [])
    return {**config["adapter"], "latent_channels": base.latent_channels, "condition_channels": channels}


def case_arrays(model_config: ModelConfig, case: common.Case, data: dict[str, Any]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(condition channels, image) of one case on the model grid, the image in the base's range."""
    segmentation = None
    if model_config.labels:
        segmentation = volumes.read_segmentation(case.files[data["segmentation_key"]])
    modalities = {name: volumes.read_volume(case.files[key]) for name, key in
                  (data.get("modality_keys") or {}).items()}
    built = conditions.assemble_conditions(model_config, segmentation, modalities)
    image = volumes.read_volume(case.files[data.get("image_key", "image")])
    on_grid = conditions.array_from_image(conditions.resample_to_grid(image, built.grid, labels=False))
    if data.get("image_percentiles"):
        low, high = data["image_percentiles"]
        scaling = conditions.IntensityScaling.from_percentiles(on_grid, low, high, case.name)
        on_grid = scaling.normalize(on_grid)
    low, high = model_config.intensity_range
    return built.channels, np.clip(on_grid, low, high).astype(np.float32)


def prepare_training_set(base: LoadedModel, model_config: ModelConfig, config: dict[str, Any],
                         run_dir: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditions `(N, C, ...)` and scaled latents `(2N, ...)` (mirror images second), cached in run_dir."""
    path = run_dir / "training_set.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return tensors["conditions"], tensors["latents"]
    cases = common.read_manifest(config["data"]["manifest"], split="train")
    limit = config["data"].get("max_cases")
    cases = cases[:limit] if limit else cases
    arrays = [case_arrays(model_config, case, config["data"]) for case in cases]
    condition = torch.from_numpy(np.stack([channels for channels, _ in arrays]))
    images = torch.from_numpy(np.stack([image for _, image in arrays]))[:, None]
    latents = common.encode_latents(base.autoencoder, torch.cat([images, images.flip(2)]), device)
    latents = latents * base.config.scale_factor
    run_dir.mkdir(parents=True, exist_ok=True)
    with common.atomic_path(path) as temporary:
        save_file({"conditions": condition.contiguous(), "latents": latents.contiguous()}, str(temporary))
    return condition, latents


def base_noise(base: LoadedModel, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The frozen base's noise prediction, with its default covariates if it takes any."""
    spec = base.config.covariates
    if spec is None:
        return base.diffusion(noisy, timesteps)
    values = torch.tensor(spec.default, dtype=noisy.dtype, device=noisy.device)
    context = values.view(1, 1, -1).expand(len(noisy), -1, -1)
    channels = values.view(1, -1, 1, 1, 1).expand(len(noisy), -1, *noisy.shape[2:])
    return base.diffusion(torch.cat([noisy, channels], 1), timesteps, context=context)


def main(argv: list[str] | None = None) -> None:
    config, run_dir = common.trainer_arguments(__doc__.splitlines()[0], argv)
    run_dir = Path(run_dir)
    context = common.setup_distributed(config.get("device"))
    settings = config["training"]
    torch.manual_seed(settings["seed"])
    base = load_model_folder(config["base_model"], device=context.device)
    if base.adapter is not None:
        raise UserError(f"base model {config['base_model']} already has an adapter; give a base-only model")
    model_config = adapter_model_config(base.config, config, "adapter", "synthesis", "")
    latent_weight = config.get("condition_latent_weight", 0.0)
    if latent_weight and model_config.adapter.params["encoder_channels"][-1] < base.config.latent_channels:
        raise UserError("condition_latent_weight needs adapter.encoder_channels[-1] >= the base's "
                        f"{base.config.latent_channels} latent channels; widen the encoder or drop it")
    adapter = VCM(**model_config.adapter.params)
    init_sha256 = None
    if config.get("init_adapter"):
        path = Path(config["init_adapter"])
        if not path.is_file():
            raise UserError(f"init_adapter {path} is not a file; give an adapter.safetensors")
        state = {name: tensor.float() for name, tensor in load_file(str(path)).items()}
        load_state_strict(adapter, state, str(path),
                          "init_adapter must match this config's adapter and conditions")
        init_sha256 = Checksums.of_file(path).sha256
    with common.main_rank_first(context):
        condition, latents = prepare_training_set(base, model_config, config, run_dir, context.device)
    schedule = base.config.noise_schedule
    # The base's training noise (`add_noise`): the sampler's DDPM scheduler over every timestep.
    scheduler, _ = build_scheduler(schedule, "ddpm", schedule.num_train_timesteps)
    count = len(condition)
    encoded = {}
    if latent_weight:  # a hook, not a second call: under DistributedDataParallel only `forward` syncs
        adapter.condition_encoder.register_forward_hook(lambda _m, _i, output: encoded.update(output=output))

    def loss_function(module, step, generator):
        index = torch.randint(count, (settings["batch_size"],), generator=generator)
        flip = torch.rand(len(index), generator=generator) < 0.5
        clean = latents[index + count * flip.long()].to(context.device)
        cond = torch.stack([c.flip(1) if f else c for c, f in zip(condition[index], flip, strict=True)])
        noise = torch.randn(clean.shape, generator=generator).to(context.device)
        timesteps = torch.randint(schedule.num_train_timesteps, (len(index),), generator=generator)
        timesteps = timesteps.to(context.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with torch.no_grad():
            eps = base_noise(base, noisy, timesteps)
        gamma, beta = module(torch.cat([noisy, eps], 1), cond.to(context.device), timesteps)
        modulated = modulate(eps, gamma, beta)
        per_sample = ((modulated - noise) ** 2).flatten(1).mean(1)
        base_per_sample = ((eps - noise) ** 2).flatten(1).mean(1)
        mse, base_mse = per_sample.mean(), base_per_sample.mean()
        fit = (per_sample / base_per_sample).mean() if config.get("relative_mse") else mse
        sparsity = gamma.abs().mean() + beta.abs().mean()
        loss = fit + config.get("sparsity_weight", 1.0) * sparsity
        extras = {"mse": mse.detach(), "base_mse": base_mse, "sparsity": sparsity.detach()}
        if latent_weight:
            condition_latent = torch.nn.functional.mse_loss(encoded["output"][:, :clean.shape[1]], clean)
            loss = loss + latent_weight * condition_latent
            extras["condition_latent_mse"] = condition_latent.detach()
        return loss, extras

    trained = common.train(adapter, loss_function, settings, run_dir, context, "adapter")
    if context.is_main:
        common.save_safetensors(trained, run_dir / ADAPTER_WEIGHTS)
        description = {"base_model": str(config["base_model"]), "conditions": config["conditions"],
                       "adapter": config["adapter"], "data": config["data"], "cases": count,
                       "init_adapter": config.get("init_adapter"),
                       # An export may overwrite that file: the hash tells which weights the run began from.
                       "init_adapter_sha256": init_sha256}
        common.write_json(run_dir / "adapter.json", description)


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
