"""The Volumetric Conditioning Module (VCM; Ahn et al., WACV 2025, arXiv 2410.21826).

VCM steers a frozen latent diffusion model: at each denoising step it reads the noisy latent
z_t, the frozen model's noise prediction eps_t and a full-resolution condition volume, and
returns a per-voxel scale gamma and shift beta, used as eps' = eps_t * (1 + gamma) + beta.

Only what the paper adds is written here (the time-free condition encoder and the heads); the
time-conditioned U-Net is MONAI's `DiffusionModelUNet`. Attribute names are chosen so that the
released reference checkpoint maps onto them by plain renames (see `checkpoints.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DiffusionModelUNet
from torch import nn

# The paper's configuration (reference `config/model_config.py`, `get_VCM_enc_CFG`): an 8-label
# condition on BrainLDM's 3-channel latent, 160x224x160 voxels encoded down to 20x28x20.
PAPER_VCM_PARAMS: dict = {
    "latent_channels": 3,
    "condition_channels": 8,
    "encoder_channels": [16, 32, 48],
    "encoder_res_blocks": 2,
    "encoder_norm_groups": 16,
    "unet_channels": [64, 128, 256],
    "unet_res_blocks": 2,
    "unet_attention_levels": [False, False, True],
    "unet_head_channels": [0, 0, 256],
    "unet_out_channels": 64,
    "unet_norm_groups": 32,
    "head_channels": 128,
    "use_flash_attention": True,
}


def modulate(noise: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, strength: float = 1.0
             ) -> torch.Tensor:
    """The paper's modulated noise eps' = eps * (1 + w * gamma) + w * beta.

    `strength` w is ControlNet's conditioning scale: 1 is the paper's (and training's) rule,
    0 the frozen base alone, above 1 follows the condition more closely than training did.
    """
    return noise * (1 + strength * gamma) + strength * beta


def _conv3(in_channels: int, out_channels: int, kernel_size: int = 3) -> Convolution:
    """A plain 3D convolution ('same' padding) as a MONAI block, so keys read `<name>.conv.*`."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        conv_only=True,
    )


def _head_conv(
    in_channels: int, out_channels: int, act: str | None = None, norm: str | None = "INSTANCE"
) -> Convolution:
    """A 3x3x3 convolution of the heads, then `act` and `norm`.

    The default is the reference's heads: MONAI `Convolution(act=None)` keeps its default norm,
    an affine-free instance normalisation.
    """
    return Convolution(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, kernel_size=3,
                       padding=1, act=act, norm=norm)


def _per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    """Expand an int to one value per level; check a list has one value per level."""
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels:
        raise ValueError(f"{name} needs one value per level ({levels}), got {values}")
    return values


class ConditionResBlock(nn.Module):
    """Residual block without time embedding, optionally halving the grid (average pooling).

    GroupNorm -> SiLU -> [pool] -> conv -> GroupNorm -> SiLU -> conv (zero-initialised, so a fresh
    block is the identity or its 1x1 projection), plus the (pooled, projected) input.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output; a 1x1 convolution projects the skip path if they
            differ from `in_channels`.
        norm_groups: groups of both group normalisations.
        norm_eps: epsilon of both group normalisations.
        downsample: if True, halve every spatial size with 2x2x2 average pooling.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm_groups: int, norm_eps: float, downsample: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.conv2 = _conv3(out_channels, out_channels)
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)
        self.skip = nn.Identity() if in_channels == out_channels else _conv3(in_channels, out_channels, 1)
        self.pool = nn.AvgPool3d(kernel_size=2, stride=2) if downsample else nn.Identity()
        self.activation = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.activation(self.norm1(x)))
        h = self.conv2(self.activation(self.norm2(self.conv1(h))))
        return self.skip(self.pool(x)) + h


class ConditionEncoderLevel(nn.Module):
    """One encoder level: residual blocks at one resolution, then a downsampling residual block.

    Args:
        in_channels: channels entering the level.
        out_channels: channels of every block of the level.
        res_blocks: residual blocks before the downsampling block.
        norm_groups: groups of the group normalisations.
        norm_eps: epsilon of the group normalisations.
    """

    def __init__(
        self, in_channels: int, out_channels: int, res_blocks: int, norm_groups: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ConditionResBlock(in_channels if i == 0 else out_channels, out_channels, norm_groups, norm_eps)
            for i in range(res_blocks)
        )
        self.downsample = ConditionResBlock(
            out_channels, out_channels, norm_groups, norm_eps, downsample=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return self.downsample(x)


class ConditionEncoder(nn.Module):
    """Takes the full-resolution condition down to the latent grid (halving once per level).

    Input `(B, in_channels, D, H, W)`, output `(B, channels[-1], D / 2**L, H / 2**L, W / 2**L)`
    with L = len(channels); D, H, W must be divisible by 2**L.

    Args:
        in_channels: condition channels (one-hot labels and/or modalities).
        channels: channels of each level; one level per halving of the grid.
        res_blocks: residual blocks per level (an int for all levels, or one per level).
        norm_groups: groups of the group normalisations.
        norm_eps: epsilon of the group normalisations.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        res_blocks: int | Sequence[int],
        norm_groups: int,
        norm_eps: float,
    ) -> None:
        super().__init__()
        blocks_per_level = _per_level(res_blocks, len(channels), "encoder_res_blocks")
        self.conv_in = _conv3(in_channels, channels[0])
        level_inputs = [channels[0], *channels[:-1]]
        self.levels = nn.ModuleList(
            ConditionEncoderLevel(level_inputs[i], channels[i], blocks_per_level[i], norm_groups, norm_eps)
            for i in range(len(channels))
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(y)
        for level in self.levels:
            h = level(h)
        return h


class VCM(nn.Module):
    """Volumetric Conditioning Module: per-voxel (gamma, beta) that modulate a frozen model's noise.

    The time-free condition encoder brings `y` to the latent grid (`encode_condition`); a
    time-conditioned MONAI `DiffusionModelUNet` (attention without output projection, as in the
    reference) reads cat(z_t, eps_t, encoded condition); a shared convolution (LeakyReLU) feeds
    two convolution heads for gamma and beta (`modulation`). `forward` is the two in a row. As in
    the reference, both heads end in an affine-free instance normalisation (MONAI `Convolution`'s
    default norm), so a fresh VCM does not start at gamma = beta = 0. `head_norm=None` drops it
    and zero-initialises the heads instead (ControlNet's zero convolution): a fresh VCM then
    leaves the base's noise as it is and learns from there, where a unit-variance start first
    learns to silence itself (our small demo adapters then stayed at gamma = beta = 0 for
    hundreds of steps).

    Shapes: `x` is cat(z_t, eps_t), `(B, 2 * latent_channels, d, h, w)`; `y` is
    `(B, condition_channels, d * 2**L, h * 2**L, w * 2**L)` with L = len(encoder_channels);
    `timesteps` is `(B,)`; the outputs (scale, shift) are each `(B, latent_channels, d, h, w)`.
    d, h, w must be divisible by 2**(len(unet_channels) - 1).

    All arguments are plain JSON values so that they can be stored in `config.json`
    (`adapter.params`); `PAPER_VCM_PARAMS` holds the paper's.

    Args:
        latent_channels: channels of the base model's latent (and of gamma and beta).
        condition_channels: channels of the condition volume.
        encoder_channels: channels of each condition-encoder level (one level per halving).
        encoder_res_blocks: residual blocks per encoder level (int or one per level).
        encoder_norm_groups: group-norm groups in the encoder.
        unet_channels: channels of each U-Net level.
        unet_res_blocks: residual blocks per U-Net level (int or one per level).
        unet_attention_levels: which U-Net levels have self-attention.
        unet_head_channels: channels per attention head at each U-Net level (0 where no attention).
        unet_out_channels: channels the U-Net hands to the shared convolution.
        unet_norm_groups: group-norm groups in the U-Net.
        head_channels: channels of the shared convolution feeding both heads.
        head_norm: the heads' output normalisation (MONAI name; the reference's "INSTANCE"), or
            None for zero-initialised heads without one.
        unet_cross_attention_dim: if set, the U-Net cross-attends to `context` of this width
            (the paper's VCM does not).
        norm_eps: epsilon of every group normalisation.
        use_flash_attention: use PyTorch's scaled-dot-product attention in the U-Net (same
            result, less memory).
    """

    def __init__(
        self,
        latent_channels: int,
        condition_channels: int,
        encoder_channels: Sequence[int],
        encoder_res_blocks: int | Sequence[int],
        encoder_norm_groups: int,
        unet_channels: Sequence[int],
        unet_res_blocks: int | Sequence[int],
        unet_attention_levels: Sequence[bool],
        unet_head_channels: int | Sequence[int],
        unet_out_channels: int,
        unet_norm_groups: int,
        head_channels: int,
        head_norm: str | None = "INSTANCE",
        unet_cross_attention_dim: int | None = None,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self.params = {
            name: list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
            for name, value in locals().items()
            if name not in ("self", "__class__")
        }
        self.latent_channels = latent_channels
        self.downsampling_factor = 2 ** len(encoder_channels)
        self.condition_encoder = ConditionEncoder(
            condition_channels, encoder_channels, encoder_res_blocks, encoder_norm_groups, norm_eps
        )
        self.time_unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=2 * latent_channels + encoder_channels[-1],
            out_channels=unet_out_channels,
            num_res_blocks=unet_res_blocks,
            channels=unet_channels,
            attention_levels=unet_attention_levels,
            norm_num_groups=unet_norm_groups,
            norm_eps=norm_eps,
            resblock_updown=True,
            num_head_channels=unet_head_channels,
            with_conditioning=unet_cross_attention_dim is not None,
            cross_attention_dim=unet_cross_attention_dim,
            upcast_attention=True,
            # The reference's GenerativeModels attention never applied its output projection
            # (MONAI issue #7991); the released weights need it left out.
            include_fc=False,
            use_flash_attention=use_flash_attention,
        )
        self.shared = _head_conv(unet_out_channels, head_channels, act="LEAKYRELU", norm=None)
        self.gamma_head = _head_conv(head_channels, latent_channels, norm=head_norm)
        self.beta_head = _head_conv(head_channels, latent_channels, norm=head_norm)
        if head_norm is None:
            for head in (self.gamma_head, self.beta_head):
                nn.init.zeros_(head.conv.weight)
                nn.init.zeros_(head.conv.bias)

    def encode_condition(self, y: torch.Tensor) -> torch.Tensor:
        """The condition `y` on the latent grid, `(B, encoder_channels[-1], d, h, w)`.

        The encoder is time-free, so a sampling run encodes once and passes the result to
        `modulation` at every step (the encoder is most of a VCM step at the paper's size).
        """
        return self.condition_encoder(y)

    def modulation(
        self,
        x: torch.Tensor,
        encoded_condition: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scale, shift) for x = cat(z_t, eps_t) and a condition from `encode_condition`."""
        if encoded_condition.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"the condition encodes to spatial size {tuple(encoded_condition.shape[2:])}, not the latent "
                f"size {tuple(x.shape[2:])}; it must be {self.downsampling_factor}x the latent"
            )
        h = self.time_unet(torch.cat([x, encoded_condition], dim=1), timesteps, context=context)
        h = self.shared(h)
        return self.gamma_head(h), self.beta_head(h)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scale, shift) = (gamma_t, beta_t) for x = cat(z_t, eps_t) and condition y."""
        return self.modulation(x, self.encode_condition(y), timesteps, context)
