"""Tiny random-weight model folders for the test suite.

Real MONAI networks and a real `networks.VCM`, small enough that a 3-step sampling run on a
16^3 grid takes well under a second on one CPU core. Weights are random but reproducible (same
`seed`, same weights), so tests can compare runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from VCMSynthesisLib.checkpoints import BRAINLDM_NOISE_SCHEDULE
from VCMSynthesisLib.model_config import ModelConfig
from VCMSynthesisLib.model_folder import save_model_folder
from VCMSynthesisLib.networks import VCM

LATENT_CHANNELS = 3
LATENT_DOWNSAMPLING = 4
TINY_STEPS = 3
# The tiny VCM: every part of the paper's (two encoder levels, several residual blocks,
# attention in the time U-Net) at a few channels. Latent 3 channels, condition 4x the latent.
TINY_VCM_PARAMS = {
    "latent_channels": LATENT_CHANNELS,
    "condition_channels": 5,
    "encoder_channels": [4, 8],
    "encoder_res_blocks": 2,
    "encoder_norm_groups": 4,
    "unet_channels": [8, 16],
    "unet_res_blocks": 1,
    "unet_attention_levels": [False, True],
    "unet_head_channels": [0, 16],
    "unet_out_channels": 8,
    "unet_norm_groups": 4,
    "head_channels": 8,
}


def _label_name(value: int) -> str:
    return "background" if value == 0 else f"label {value}"


def tiny_config(
    *,
    labels: Sequence[int] | None = (0, 1, 2, 3),
    modalities: Sequence[str] | None = ("T2",),
    grid: Sequence[int] = (16, 16, 16),
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    task: str = "synthesis",
    with_adapter: bool = True,
    covariates: Sequence[str] | None = None,
    scheduler: str = "ddim",
    name: str = "tiny",
) -> ModelConfig:
    """The config.json of a tiny model (grid sizes must be multiples of 8; `scheduler` is its
    default sampler, `sampling.scheduler`)."""
    labels = tuple(labels or ())
    modalities = tuple(modalities or ())
    condition_channels = len(labels) + len(modalities)
    covariate_count = len(covariates) if covariates else 0
    base_covariates = {"names": list(covariates), "default": [0.5] * covariate_count} if covariates else None
    diffusion_params = {
        "spatial_dims": 3,
        "in_channels": LATENT_CHANNELS + covariate_count,
        "out_channels": LATENT_CHANNELS,
        "channels": [8, 8],
        "num_res_blocks": 1,
        "norm_num_groups": 4,
        "attention_levels": [False, bool(covariates)],
        "num_head_channels": [0, 8] if covariates else 8,
    }
    if covariates:
        diffusion_params.update(with_conditioning=True, cross_attention_dim=covariate_count)
    data = {
        "format_version": 1,
        "name": name,
        "task": task,
        "description": "tiny random-weight model for tests",
        "grid": {"spacing": list(spacing), "size": list(grid), "orientation": "RAS"},
        "intensity": {"range": [0.0, 1.0]},
        "autoencoder": {
            "weights": "autoencoder.safetensors",
            "params": {
                "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": LATENT_CHANNELS,
                "channels": [4, 8, 8], "num_res_blocks": 1, "norm_num_groups": 4,
                "attention_levels": [False, False, False],
                "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
            },
        },
        "diffusion": {
            "weights": "diffusion.safetensors",
            "params": diffusion_params,
            "covariates": base_covariates,
        },
        "adapter": {"weights": "adapter.safetensors",
                    "params": {**TINY_VCM_PARAMS, "condition_channels": condition_channels}}
        if with_adapter else None,
        "latent": {"channels": LATENT_CHANNELS, "scale_factor": 0.9},
        "scheduler": BRAINLDM_NOISE_SCHEDULE,
        "sampling": {"scheduler": scheduler, "steps": TINY_STEPS},
        "conditions": {
            "labels": {"table": [{"value": v, "name": _label_name(v)} for v in labels]} if labels else None,
            "modalities": [{"name": m, "normalization": {"kind": "percentile", "low": 1.0, "high": 99.0}}
                           for m in modalities],
        },
    }
    return ModelConfig.from_dict(data, source=f"tiny model {name!r}")


def tiny_networks(config: ModelConfig, seed: int = 0):
    """Random networks for `config`: (autoencoder, diffusion, adapter or None), reproducible by seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = AutoencoderKL(**config.autoencoder.params)
        diffusion = DiffusionModelUNet(**config.diffusion.params)
        adapter = VCM(**config.adapter.params) if config.adapter is not None else None
        networks = (autoencoder, diffusion, adapter)
        # MONAI zero-initialises U-Net output convolutions, so an untrained U-Net predicts 0
        # whatever its input; filling all-zero weights makes every input matter in tests.
        with torch.no_grad():
            for network in filter(None, networks):
                for parameter in network.parameters():
                    if not parameter.any():
                        parameter.normal_(0.0, 0.1)
    return networks


def make_tiny_model_folder(path: str | Path, *, seed: int = 0, **options: Any) -> Path:
    """Writes a valid tiny model folder at `path` and returns it.

    `options` are `tiny_config`'s keywords (the model is named after the folder). Condition
    channels: one per label value (0 is "background", k is "label k"), then one per modality
    (percentile-normalized). Default sampling: DDIM (option `scheduler`), `TINY_STEPS` steps.
    """
    path = Path(path)
    config = tiny_config(name=path.name or "tiny", **options)
    return save_model_folder(path, config, *tiny_networks(config, seed))


def expected_provenance(model_folder: str | Path, *, seed: int, steps: int, strength: float = 1.0,
                        scheduler: str | None = None) -> dict:
    """The provenance fields a result of this model folder must carry, worked out from the folder
    itself (its config.json and the bytes of its adapter weights, else its diffusion weights);
    `scheduler` None: the model's default."""
    import hashlib
    import json

    from VCMSynthesisLib import __version__

    folder = Path(model_folder)
    config = json.loads((folder / "config.json").read_text())
    weights = folder / (config.get("adapter") or config["diffusion"])["weights"]
    return {"vcm_model": config["name"], "vcm_model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "vcm_seed": str(seed), "vcm_steps": str(steps),
            "vcm_scheduler": scheduler or config["sampling"]["scheduler"],
            "vcm_strength": repr(float(strength)), "vcm_version": __version__}


def provenance_in_nrrd(path: str | Path) -> dict:
    """The `vcm_*` key/value fields of an NRRD header, as pynrrd reads them."""
    import nrrd

    return {key: value for key, value in nrrd.read_header(str(path)).items() if key.startswith("vcm_")}

