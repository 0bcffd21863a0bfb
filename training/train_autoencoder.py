"""Train the demo base model's autoencoder (MONAI AutoencoderKL) on random patches of the images.

The network is fully convolutional, so patches train it for whole volumes at a fraction of the
cost; its group normalisations see other statistics in a whole volume, so a last stage on
(nearly) whole volumes calibrates them. Loss: L1 + an edge term (L1 of the finite differences,
against the blur that L1 alone gives without an adversary) + a small KL term. With
`init_from: <run>` training starts from that run's weights; with `decoder_only: true` the
encoder stays frozen (latents, and the base models trained on them, stay valid) and the decoder
learns to decode latent means. With `latent: mean` the encoder's log-variance head is pinned to
its minimum (sigma ~ 3e-7), so the decoder always sees the latent mean: with sampled latents at
sigma ~ 1 the shipped demo decoder learned to ignore the latent's detail (posterior collapse).
The KL term then counts the means only: it keeps their scale in check. Writes
`autoencoder.safetensors` and `autoencoder.json` (its AutoencoderKL keyword arguments) into the
run directory.

    python training/train_autoencoder.py --config training/configs/demo_autoencoder.yaml \
        --run-dir training/runs/autoencoder
"""

from __future__ import annotations

from pathlib import Path

import common
import torch
from monai.networks.nets import AutoencoderKL
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.errors import UserError


def load_images(manifest: str, key: str) -> torch.Tensor:
    """The training split's images `(N, 1, X, Y, Z)`."""
    cases = common.read_manifest(manifest, split="train")
    return torch.stack([torch.from_numpy(common.read_array(case.files[key]))[None] for case in cases])


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def edge_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance of the finite differences along the three spatial axes."""
    total = prediction.new_zeros(())
    for axis in (2, 3, 4):
        total = total + (prediction.diff(dim=axis) - target.diff(dim=axis)).abs().mean()
    return total / 3


def pin_latent_to_mean(model: AutoencoderKL) -> None:
    """Freeze the log-variance head at MONAI's lower clamp: every sampled latent is its mean."""
    head = model.quant_conv_log_sigma.conv
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
    head.requires_grad_(False)


def random_patches(images: torch.Tensor, batch_size: int, patch: int, generator: torch.Generator
                   ) -> torch.Tensor:
    """`batch_size` random cubes of side `patch` from random images, each flipped left-right at random."""
    patches = []
    for _ in range(batch_size):
        index = int(torch.randint(len(images), (), generator=generator))
        corner = [int(torch.randint(size - patch + 1, (), generator=generator)) for size in images.shape[2:]]
        crop = images[index:index + 1, :, corner[0]:corner[0] + patch, corner[1]:corner[1] + patch,
                      corner[2]:corner[2] + patch]
        patches.append(common.random_flip([crop], generator)[0])
    return torch.cat(patches)


def main(argv: list[str] | None = None) -> None:
    config, run_dir = common.trainer_arguments(__doc__.splitlines()[0], argv)
    context = common.setup_distributed(config.get("device"))
    settings = config["training"]
    torch.manual_seed(settings["seed"])
    params = config["autoencoder"]
    model = AutoencoderKL(**params)
    if config.get("init_from"):
        model.load_state_dict(common.load_autoencoder(config["init_from"])[0].state_dict())
    latent = config.get("latent", "sample")
    if latent not in ("sample", "mean"):
        raise UserError(f"latent is {latent!r}; write 'latent: mean' (deterministic) or 'latent: sample'")
    latent_is_mean = latent == "mean"
    if latent_is_mean:
        pin_latent_to_mean(model)
    decoder_only = bool(config.get("decoder_only"))
    if decoder_only and context.world_size > 1:
        raise UserError("decoder_only runs in one process (it bypasses DDP); run it without torchrun")
    if decoder_only:
        for frozen in (model.encoder, model.quant_conv_mu, model.quant_conv_log_sigma):
            frozen.requires_grad_(False)
    images = load_images(config["data"]["manifest"], config["data"].get("image_key", "image"))
    patch = int(config["patch_size"])
    weights = config["loss"]

    def loss_function(module, step, generator):
        batch = random_patches(images, settings["batch_size"], patch, generator).to(context.device)
        if decoder_only:
            with torch.no_grad():
                mu, sigma = model.encode(batch)
            reconstruction = model.decode(mu)
        else:
            reconstruction, mu, sigma = module(batch)
        l1 = (reconstruction - batch).abs().mean()
        edges = edge_loss(reconstruction, batch)
        # A pinned sigma only adds a constant (~15 per latent value) that would swamp the logged loss.
        kl = kl_divergence(mu, torch.ones_like(sigma) if latent_is_mean else sigma)
        loss = l1 + weights["edge"] * edges + weights["kl"] * kl
        return loss, {"l1": l1.detach(), "edge": edges.detach(), "kl": kl.detach()}

    trained = common.train(model, loss_function, settings, run_dir, context, "autoencoder")
    if context.is_main:
        common.save_safetensors(trained, Path(run_dir) / "autoencoder.safetensors")
        common.write_json(Path(run_dir) / "autoencoder.json", params)
        if config.get("init_from"):
            common.write_json(Path(run_dir) / common.INIT_FROM_NAME, {"init_from": str(config["init_from"])})


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
