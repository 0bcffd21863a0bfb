"""VCM network: shapes, JSON-able configuration, and parity with the paper's reference layout.

Parity is checked against an independent forward pass: the older MONAI GenerativeModels
`DiffusionModelUNet` (the package the reference used) for the time U-Net, plus a functional
re-implementation of the reference `models/vcm.py` encoder and heads written here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from generative.networks.nets import DiffusionModelUNet as GenerativeDiffusionModelUNet
from tiny_models import TINY_VCM_PARAMS
from VCMSynthesisLib.checkpoints import load_reference_vcm
from VCMSynthesisLib.networks import PAPER_VCM_PARAMS, VCM

LATENT_SIZE = (4, 6, 4)
PARITY_TOLERANCE = 1e-5


def reference_unet_params(params: dict) -> dict:
    """The reference's time U-Net kwargs (GenerativeModels naming) for VCM kwargs `params`."""
    return {
        "spatial_dims": 3,
        "in_channels": 2 * params["latent_channels"] + params["encoder_channels"][-1],
        "out_channels": params["unet_out_channels"],
        "num_channels": params["unet_channels"],
        "num_res_blocks": params["unet_res_blocks"],
        "attention_levels": params["unet_attention_levels"],
        "norm_num_groups": params["unet_norm_groups"],
        "norm_eps": 1e-6,
        "resblock_updown": True,
        "num_head_channels": params["unet_head_channels"],
        "upcast_attention": True,
        "use_flash_attention": False,  # the GenerativeModels version needs xformers for it
    }


def reference_encoder_and_head_shapes(params: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the reference's `modality_encoder` and `mlp_*` heads."""
    shapes = {}

    def conv(name: str, out_channels: int, in_channels: int, kernel: int = 3) -> None:
        shapes[f"{name}.conv.weight"] = (out_channels, in_channels, kernel, kernel, kernel)
        shapes[f"{name}.conv.bias"] = (out_channels,)

    def resnet(name: str, in_channels: int, out_channels: int) -> None:
        shapes[f"{name}.norm1.weight"] = shapes[f"{name}.norm1.bias"] = (in_channels,)
        conv(f"{name}.conv1", out_channels, in_channels)
        shapes[f"{name}.norm2.weight"] = shapes[f"{name}.norm2.bias"] = (out_channels,)
        conv(f"{name}.conv2", out_channels, out_channels)
        if in_channels != out_channels:
            conv(f"{name}.skip_connection", out_channels, in_channels, kernel=1)

    channels = params["encoder_channels"]
    conv("modality_encoder.conv_in", channels[0], params["condition_channels"])
    for level, out_channels in enumerate(channels):
        in_channels = channels[max(level - 1, 0)]
        for block in range(params["encoder_res_blocks"]):
            resnet(f"modality_encoder.down_blocks.{level}.resnets.{block}",
                   in_channels if block == 0 else out_channels, out_channels)
        resnet(f"modality_encoder.down_blocks.{level}.downsampler", out_channels, out_channels)
    conv("mlp_shared", params["head_channels"], params["unet_out_channels"])
    conv("mlp_gamma", params["latent_channels"], params["head_channels"])
    conv("mlp_beta", params["latent_channels"], params["head_channels"])
    return shapes


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (the fresh networks zero some layers, which would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def reference_resnet(x: torch.Tensor, state: dict, name: str, groups: int, downsample: bool) -> torch.Tensor:
    """The reference's time-free ResnetBlock.forward, written with torch.nn.functional."""
    h = F.silu(F.group_norm(x, groups, state[f"{name}.norm1.weight"], state[f"{name}.norm1.bias"], 1e-6))
    if downsample:
        x, h = F.avg_pool3d(x, 2, 2), F.avg_pool3d(h, 2, 2)
    h = F.conv3d(h, state[f"{name}.conv1.conv.weight"], state[f"{name}.conv1.conv.bias"], padding=1)
    h = F.silu(F.group_norm(h, groups, state[f"{name}.norm2.weight"], state[f"{name}.norm2.bias"], 1e-6))
    h = F.conv3d(h, state[f"{name}.conv2.conv.weight"], state[f"{name}.conv2.conv.bias"], padding=1)
    skip = f"{name}.skip_connection.conv.weight"
    if skip in state:
        x = F.conv3d(x, state[skip], state[f"{name}.skip_connection.conv.bias"])
    return x + h


def reference_forward(
    state: dict, unet: torch.nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference `VCM.forward` (encoder, time U-Net, mlp_shared, mlp_gamma / mlp_beta)."""
    groups = params["encoder_norm_groups"]

    def conv(tensor: torch.Tensor, name: str) -> torch.Tensor:
        return F.conv3d(tensor, state[f"{name}.conv.weight"], state[f"{name}.conv.bias"], padding=1)

    h = conv(y, "modality_encoder.conv_in")
    for level in range(len(params["encoder_channels"])):
        prefix = f"modality_encoder.down_blocks.{level}"
        for block in range(params["encoder_res_blocks"]):
            h = reference_resnet(h, state, f"{prefix}.resnets.{block}", groups, False)
        h = reference_resnet(h, state, f"{prefix}.downsampler", groups, True)
    u = unet(torch.cat([x, h], dim=1), t)
    u = F.leaky_relu(conv(u, "mlp_shared"), 0.01)
    # MONAI Convolution(act=None) keeps its default norm: affine-free InstanceNorm3d (eps 1e-5).
    return F.instance_norm(conv(u, "mlp_gamma")), F.instance_norm(conv(u, "mlp_beta"))


def inputs(params: dict, latent_size=LATENT_SIZE, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    factor = 2 ** len(params["encoder_channels"])
    x = torch.randn(2, 2 * params["latent_channels"], *latent_size, generator=generator)
    y = torch.rand(2, params["condition_channels"], *(s * factor for s in latent_size), generator=generator)
    return x, y, torch.tensor([999, 17])


def assert_parity(
    got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], label: str, capsys
) -> None:
    """Prints the largest absolute difference (the parity figure) and checks it is within tolerance."""
    difference = max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True))
    with capsys.disabled():
        print(f"\n{label}: max abs diff {difference:.2e}")
    assert difference <= PARITY_TOLERANCE


def save_reference_checkpoint(path: Path, params: dict) -> tuple[dict, torch.nn.Module]:
    """Writes a random reference-layout, DDP-prefixed checkpoint; returns its state and U-Net."""
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * 0.1
             for name, shape in reference_encoder_and_head_shapes(params).items()}
    unet = GenerativeDiffusionModelUNet(**reference_unet_params(params)).eval()
    randomize(unet, seed=2)
    state.update({f"time_unet.{name}": tensor for name, tensor in unet.state_dict().items()})
    torch.save({f"module.{name}": tensor for name, tensor in state.items()}, path)
    return state, unet


def test_forward_shapes_and_json_params():
    vcm = VCM(**TINY_VCM_PARAMS).eval()
    x, y, t = inputs(TINY_VCM_PARAMS)
    with torch.no_grad():
        scale, shift = vcm(x, y, t)
    assert scale.shape == shift.shape == (2, 3, *LATENT_SIZE)
    assert torch.isfinite(scale).all() and not torch.equal(scale, shift)
    rebuilt = VCM(**json.loads(json.dumps(vcm.params)))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in vcm.state_dict().items()}


def test_forward_is_modulation_of_the_encoded_condition():
    vcm = VCM(**TINY_VCM_PARAMS).eval()
    randomize(vcm, seed=4)
    x, y, t = inputs(TINY_VCM_PARAMS)
    with torch.no_grad():
        encoded = vcm.encode_condition(y)
        direct = vcm(x, y, t)
        cached = [vcm.modulation(x, encoded, step) for step in (t, t.flip(0))]
        assert encoded.shape == (2, TINY_VCM_PARAMS["encoder_channels"][-1], *LATENT_SIZE)
        for got, want in zip(cached[0], direct, strict=True):
            assert torch.equal(got, want)
        assert not torch.equal(cached[1][0], direct[0])  # the timesteps still matter


def test_zero_initialised_heads_start_at_the_identity_and_still_learn():
    """head_norm=None: a fresh VCM leaves the noise unchanged, and one step moves it off zero."""
    x, y, t = inputs(TINY_VCM_PARAMS)
    reference_heads = VCM(**TINY_VCM_PARAMS)
    with torch.no_grad():
        assert reference_heads(x, y, t)[0].std() > 0.5  # the reference's instance norm: unit variance
    vcm = VCM(**TINY_VCM_PARAMS, head_norm=None)
    assert vcm.state_dict().keys() == reference_heads.state_dict().keys()
    scale, shift = vcm(x, y, t)
    assert not scale.any() and not shift.any()
    optimizer = torch.optim.SGD(vcm.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(scale + shift, torch.ones_like(scale)).backward()
    optimizer.step()
    with torch.no_grad():
        assert vcm(x, y, t)[1].abs().mean() > 0


def test_condition_of_wrong_size_is_refused():
    vcm = VCM(**TINY_VCM_PARAMS)
    x, y, t = inputs(TINY_VCM_PARAMS)
    with pytest.raises(ValueError, match="must be 4x the latent"):
        vcm(x, y[:, :, :8], t)


def test_paper_config_has_the_released_size():
    parameters = sum(p.numel() for p in VCM(**PAPER_VCM_PARAMS).parameters())
    assert round(parameters / 1e6) == 45  # the released checkpoint holds 45 M parameters


def test_reference_checkpoint_parity(tmp_path, capsys):
    path = tmp_path / "vcm_reference_layout.pt"
    state, unet = save_reference_checkpoint(path, TINY_VCM_PARAMS)
    vcm = load_reference_vcm(path, TINY_VCM_PARAMS)
    assert not vcm.training
    x, y, t = inputs(TINY_VCM_PARAMS)
    with torch.no_grad():
        scale, shift = vcm(x, y, t)
        expected_scale, expected_shift = reference_forward(state, unet, TINY_VCM_PARAMS, x, y, t)
    assert_parity((scale, shift), (expected_scale, expected_shift), "reference-layout parity (tiny config)",
                  capsys)
    assert expected_scale.abs().max() > 0.1  # the comparison is not between two zero tensors


def _reference_vcm_module(repository: Path, folder: Path):
    """Imports the reference `models/vcm.py` from a checkout or a bare git mirror (kept in tmp)."""
    source = repository / "models" / "vcm.py"
    if source.is_file():
        text = source.read_text()
    else:
        text = subprocess.run(["git", "--git-dir", str(repository), "show", "HEAD:models/vcm.py"],
                              check=True, capture_output=True, text=True).stdout
    module_path = folder / "reference_vcm.py"
    module_path.write_text(text)
    spec = importlib.util.spec_from_file_location("reference_vcm", module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reference_implementation_parity_paper_config(tmp_path, capsys):
    repository = os.environ.get("VCM_REFERENCE_REPO")
    if not repository:
        pytest.skip("set VCM_REFERENCE_REPO to a checkout or git mirror of github.com/Ahn-Ssu/VCM")
    reference = _reference_vcm_module(Path(repository), tmp_path)
    params = PAPER_VCM_PARAMS
    encoder_params = {
        "spatial_dims": 3, "in_channels": params["condition_channels"],
        "num_channels": params["encoder_channels"], "num_res_blocks": (2, 2, 2),
        "attention_levels": [False, False, False], "norm_num_groups": params["encoder_norm_groups"],
        "norm_eps": 1e-6, "resblock_updown": True, "num_head_channels": [0, 0, 0],
        "transformer_num_layers": 1, "upcast_attention": True,
    }
    model = reference.VCM(out_dim=3, diff_CFG=reference_unet_params(params), enc_CFG=encoder_params).eval()
    randomize(model, seed=3)
    path = tmp_path / "vcm_wegith_reference.pt"
    torch.save({f"module.{name}": tensor for name, tensor in model.state_dict().items()}, path)
    vcm = load_reference_vcm(path)
    x, y, t = inputs(params, latent_size=(4, 8, 4))
    with torch.no_grad():
        scale, shift = vcm(x, y, t)
        expected_scale, expected_shift = model(x, y, t)
    assert_parity((scale, shift), (expected_scale, expected_shift),
                  "reference implementation parity (paper config)", capsys)
