"""Safe checkpoint loading, BrainLDM in both layouts, strict errors, and `import-reference`.

Old-layout (GenerativeModels) checkpoints are produced with the `monai-generative` package the
released BrainLDM and VCM weights came from; their outputs are the expected values.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from generative.networks.nets import AutoencoderKL as GenerativeAutoencoderKL
from generative.networks.nets import DiffusionModelUNet as GenerativeDiffusionModelUNet
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from test_networks import inputs, randomize, save_reference_checkpoint
from tiny_models import TINY_VCM_PARAMS
from VCMSynthesisLib import cli
from VCMSynthesisLib.checkpoints import (
    BRAINLDM_COVARIATE_DEFAULT,
    BRAINLDM_COVARIATE_NAMES,
    BRAINLDM_SCALE_FACTOR,
    load_brainldm,
    load_reference_vcm,
    load_torch_checkpoint,
)
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_folder import load_model_folder

# BrainLDM's structure at toy sizes: no attention in the autoencoder; covariates concatenated
# (3 + 4 input channels) and cross-attended (dimension 4) by the diffusion model.
OLD_AUTOENCODER_PARAMS = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 3,
    "num_channels": [4, 8, 8], "num_res_blocks": 1, "norm_num_groups": 4,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
OLD_DIFFUSION_PARAMS = {
    "spatial_dims": 3, "in_channels": 7, "out_channels": 3, "num_channels": [8, 16],
    "num_res_blocks": 1, "attention_levels": [False, True], "norm_num_groups": 4,
    "resblock_updown": True, "num_head_channels": [0, 8], "with_conditioning": True,
    "transformer_num_layers": 1, "cross_attention_dim": 4, "upcast_attention": True,
}


def current_params(old_params: dict) -> dict:
    """The same network in MONAI core's argument names."""
    params = {key: value for key, value in old_params.items() if key != "num_channels"}
    return {**params, "channels": old_params["num_channels"]}


def save_old_brainldm(folder):
    """Random GenerativeModels-layout BrainLDM-like checkpoints; returns (paths, networks)."""
    autoencoder = GenerativeAutoencoderKL(**OLD_AUTOENCODER_PARAMS).eval()
    diffusion = GenerativeDiffusionModelUNet(**OLD_DIFFUSION_PARAMS).eval()
    randomize(autoencoder, seed=4)
    randomize(diffusion, seed=5)
    paths = folder / "autoencoder.pth", folder / "diffusion_model.pth"
    torch.save(autoencoder.state_dict(), paths[0])
    torch.save(diffusion.state_dict(), paths[1])
    return paths, (autoencoder, diffusion)


def diffusion_inputs():
    generator = torch.Generator().manual_seed(6)
    latent = torch.randn(2, 3, 4, 4, 4, generator=generator)
    covariates = torch.rand(2, 1, 4, generator=generator)
    concatenated = covariates.view(2, 4, 1, 1, 1).expand(2, 4, 4, 4, 4)
    return torch.cat([latent, concatenated], dim=1), torch.tensor([500, 3]), covariates


def assert_brainldm_matches(autoencoder, diffusion, expected_autoencoder, expected_diffusion):
    image = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    x, timesteps, context = diffusion_inputs()
    with torch.no_grad():
        z_mu, z_sigma = autoencoder.encode(image)
        expected_mu, expected_sigma = expected_autoencoder.encode(image)
        decoded = autoencoder.decode(z_mu)
        expected_decoded = expected_autoencoder.decode(expected_mu)
        noise = diffusion(x, timesteps, context=context)
        expected_noise = expected_diffusion(x, timesteps, context=context)
    torch.testing.assert_close(z_mu, expected_mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(z_sigma, expected_sigma, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, expected_decoded, atol=1e-5, rtol=0)
    torch.testing.assert_close(noise, expected_noise, atol=1e-5, rtol=0)
    assert expected_noise.abs().max() > 0.1


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"

    class CreatesMarker:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = tmp_path / "malicious.pt"
    torch.save({"weight": torch.zeros(2), "payload": CreatesMarker()}, path)
    with pytest.raises(UserError, match="refuses to unpickle code") as error:
        load_torch_checkpoint(path)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really runs code when unpickled unsafely
    assert marker.exists()


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    (b"hello, I am a text file\n", "not a readable PyTorch checkpoint"),
    (b"", "not a readable PyTorch checkpoint"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("list", "is not a state dict"),
])
def test_files_that_are_not_state_dicts_are_refused(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    if content == "truncated":
        torch.save({"weight": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_torch_checkpoint(path)
    assert "\n" not in str(error.value)


def test_brainldm_old_layout_matches_generative_models(tmp_path):
    (autoencoder_path, diffusion_path), expected = save_old_brainldm(tmp_path)
    autoencoder, diffusion = load_brainldm(
        autoencoder_path, diffusion_path,
        current_params(OLD_AUTOENCODER_PARAMS),
        {**current_params(OLD_DIFFUSION_PARAMS), "use_flash_attention": True},
    )
    assert isinstance(autoencoder, AutoencoderKL) and isinstance(diffusion, DiffusionModelUNet)
    assert not autoencoder.training and not diffusion.training
    assert_brainldm_matches(autoencoder, diffusion, *expected)


def test_brainldm_current_layout_loads(tmp_path):
    _, (old_autoencoder, old_diffusion) = save_old_brainldm(tmp_path)
    expected_autoencoder, expected_diffusion = load_brainldm(
        tmp_path / "autoencoder.pth", tmp_path / "diffusion_model.pth",
        current_params(OLD_AUTOENCODER_PARAMS), current_params(OLD_DIFFUSION_PARAMS),
    )
    torch.save(expected_autoencoder.state_dict(), tmp_path / "autoencoder_current.pth")
    torch.save(expected_diffusion.state_dict(), tmp_path / "diffusion_current.pth")
    autoencoder, diffusion = load_brainldm(
        tmp_path / "autoencoder_current.pth", tmp_path / "diffusion_current.pth",
        current_params(OLD_AUTOENCODER_PARAMS), current_params(OLD_DIFFUSION_PARAMS),
    )
    for loaded, expected in ((autoencoder, expected_autoencoder), (diffusion, expected_diffusion)):
        for (name, tensor), expected_tensor in zip(loaded.state_dict().items(),
                                                   expected.state_dict().values(), strict=True):
            assert torch.equal(tensor, expected_tensor), name
    assert_brainldm_matches(autoencoder, diffusion, old_autoencoder, old_diffusion)


@pytest.mark.parametrize(("edit", "message"), [
    ("drop", "lacks tensor 'gamma_head.conv.bias'"),
    ("reshape", r"tensor 'condition_encoder.conv_in.conv.weight' has shape \[4, 5, 3, 3\]"),
    ("extra", "has tensor 'mlp_delta.conv.weight' that the network lacks"),
    ("drop_unet", "lacks tensor 'time_unet.time_embed.0.weight'"),
    ("drop_attention", "lacks tensor 'time_unet.middle_block.attention.to_k.weight'"),
])
def test_reference_vcm_mismatch_names_the_tensor(tmp_path, edit, message):
    path = tmp_path / "vcm.pt"
    save_reference_checkpoint(path, TINY_VCM_PARAMS)
    state = torch.load(path, weights_only=True)
    if edit == "drop":
        del state["module.mlp_gamma.conv.bias"]
    elif edit == "reshape":
        state["module.modality_encoder.conv_in.conv.weight"] = torch.zeros(4, 5, 3, 3)
    elif edit == "extra":
        state["module.mlp_delta.conv.weight"] = torch.zeros(3)
    elif edit == "drop_unet":
        del state["module.time_unet.time_embed.0.weight"]
    else:
        del state["module.time_unet.middle_block.attention.to_k.weight"]
    torch.save(state, path)
    with pytest.raises(UserError, match=message) as raised:
        load_reference_vcm(path, TINY_VCM_PARAMS)
    assert str(raised.value).startswith(f"checkpoint {path}") and "\n" not in str(raised.value)


def test_brainldm_of_other_sizes_is_refused_naming_the_tensor(tmp_path):
    (autoencoder_path, diffusion_path), _ = save_old_brainldm(tmp_path)
    with pytest.raises(UserError, match=r"autoencoder.pth: tensor '.*' has shape"):
        load_brainldm(autoencoder_path, diffusion_path,
                      {**current_params(OLD_AUTOENCODER_PARAMS), "channels": [8, 8, 8]},
                      current_params(OLD_DIFFUSION_PARAMS))


def write_import_inputs(folder):
    vcm_params = {**TINY_VCM_PARAMS, "condition_channels": 8}
    vcm_path = folder / "vcm_wegith_complexSemantics.pt"
    save_reference_checkpoint(vcm_path, vcm_params)
    (autoencoder_path, diffusion_path), brainldm = save_old_brainldm(folder)
    params_path = folder / "sizes.json"
    params_path.write_text(json.dumps({
        "adapter": vcm_params,
        "autoencoder": current_params(OLD_AUTOENCODER_PARAMS),
        "diffusion": current_params(OLD_DIFFUSION_PARAMS),
    }))
    arguments = ["import-reference", "--vcm", str(vcm_path), "--autoencoder", str(autoencoder_path),
                 "--diffusion", str(diffusion_path), "--params", str(params_path)]
    return arguments, vcm_params, brainldm


def assert_one_error_line(stderr: str, expected: str) -> None:
    """The CLI ends with one `error: ...` line (after its progress line) and no traceback."""
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1]
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in stderr


def test_import_reference_cli_writes_a_loadable_model_folder(tmp_path, capsys):
    arguments, vcm_params, (old_autoencoder, old_diffusion) = write_import_inputs(tmp_path)
    output = tmp_path / "models" / "paper"
    assert cli.main([*arguments, "--output", str(output), "--name", "paper"]) == 0
    assert capsys.readouterr().out.strip() == str(output)

    model = load_model_folder(output)
    config = model.config
    assert config.name == "paper" and config.task == "synthesis"
    assert config.grid.size == (160, 224, 160) and config.grid.orientation == "LAS"
    assert config.covariates.names == BRAINLDM_COVARIATE_NAMES
    assert config.covariates.default == BRAINLDM_COVARIATE_DEFAULT
    assert config.scale_factor == BRAINLDM_SCALE_FACTOR
    labels = [(label.value, label.name) for label in config.labels]
    assert len(labels) == 8 and labels[::7] == [(1, "white matter"), (8, "brainstem")]
    sources = config.metadata["imported_from"]
    assert set(sources) == {"adapter", "autoencoder", "diffusion"}
    adapter_bytes = (tmp_path / "vcm_wegith_complexSemantics.pt").read_bytes()
    assert sources["adapter"]["sha256"] == hashlib.sha256(adapter_bytes).hexdigest()
    card = (output / "README.md").read_text()
    assert "8 brainstem" in card and "INFERRED from the" in card and "--label-map aseg" in card

    expected = load_reference_vcm(tmp_path / "vcm_wegith_complexSemantics.pt", vcm_params)
    x, y, t = inputs(vcm_params)
    with torch.no_grad():
        for got, want in zip(model.adapter(x, y, t), expected(x, y, t), strict=True):
            # loaded channels-last on the CPU (model_folder.frozen): equal up to float rounding
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_brainldm_matches(model.autoencoder, model.diffusion, old_autoencoder, old_diffusion)


def test_import_reference_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, capsys):
    arguments, _, _ = write_import_inputs(tmp_path)
    output = tmp_path / "my_documents"
    output.mkdir()
    (output / "thesis.txt").write_text("precious")
    assert cli.main([*arguments, "--output", str(output)]) == 1
    assert_one_error_line(capsys.readouterr().err, "is not a model folder")
    assert [path.name for path in output.iterdir()] == ["thesis.txt"]


def test_import_reference_cli_reports_a_missing_file_in_one_line(tmp_path, capsys):
    arguments, _, _ = write_import_inputs(tmp_path)
    arguments[arguments.index("--vcm") + 1] = str(tmp_path / "nope.pt")
    output = tmp_path / "out"
    assert cli.main([*arguments, "--output", str(output)]) == 1
    assert_one_error_line(capsys.readouterr().err, "nope.pt does not exist")
    assert not output.exists()


@pytest.mark.parametrize(("params_text", "message"), [
    ("{not json", "cannot read --params file"),
    ('{"vae": {}}', "keys are among adapter, autoencoder, diffusion"),
    ('{"adapter": {"latent_channels": 3}}', "the --params sizes do not build a network"),
])
def test_import_reference_cli_reports_bad_params_in_one_line(tmp_path, capsys, params_text, message):
    arguments, _, _ = write_import_inputs(tmp_path)
    (tmp_path / "sizes.json").write_text(params_text)
    output = tmp_path / "out"
    assert cli.main([*arguments, "--output", str(output)]) == 1
    assert_one_error_line(capsys.readouterr().err, message)
    assert not output.exists()
