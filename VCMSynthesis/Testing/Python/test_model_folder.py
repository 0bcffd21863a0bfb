"""Model folder format: config.json checks, strict safetensors loading, atomic saving."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model_folder, tiny_config, tiny_networks
from VCMSynthesisLib import model_folder
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig
from VCMSynthesisLib.model_folder import load_model_folder, save_model_folder


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    return make_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny", seed=3)


def _copy(folder: Path, target: Path) -> Path:
    target.mkdir()
    for item in folder.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def _edit_config(folder: Path, edit) -> None:
    data = json.loads((folder / CONFIG_NAME).read_text())
    edit(data)
    (folder / CONFIG_NAME).write_text(json.dumps(data))


def test_round_trip_gives_identical_networks_and_outputs(saved_folder):
    config = tiny_config()
    autoencoder, diffusion, adapter = tiny_networks(config, seed=3)
    loaded = load_model_folder(saved_folder)

    assert loaded.config == ModelConfig.from_dict(loaded.config.to_dict())
    assert json.loads((saved_folder / CONFIG_NAME).read_text()) == loaded.config.to_dict()
    for original, restored in ((autoencoder, loaded.autoencoder), (diffusion, loaded.diffusion),
                               (adapter, loaded.adapter)):
        original.eval()
        restored_state = restored.state_dict()
        for name, tensor in original.state_dict().items():
            assert torch.equal(tensor, restored_state[name]), name
        assert not restored.training
        assert not any(p.requires_grad for p in restored.parameters())

    latent = torch.randn(1, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    condition = torch.rand(1, 5, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(autoencoder.decode(latent), loaded.autoencoder.decode(latent))
        # The base runs on its weights file's mapped pages, unaligned for SIMD: float rounding moves.
        torch.testing.assert_close(loaded.diffusion(latent, t), diffusion(latent, t), rtol=0, atol=1e-5)
        x = torch.cat([latent, latent], 1)
        for a, b in zip(adapter(x, condition, t), loaded.adapter(x, condition, t), strict=True):
            assert torch.equal(a, b)
    assert (saved_folder / "README.md").read_text().startswith("# tiny")


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def test_the_base_models_parameters_are_its_weights_files_pages(saved_folder):
    """Mapped, not copied: the OS may reclaim them while the decoder runs, without swap. The
    networks copied into the channels-last layout are not."""
    loaded = load_model_folder(saved_folder)
    config = loaded.config

    def inside(network, file):
        ranges = _mapped_ranges(saved_folder / file)
        return [any(low <= p.data_ptr() < high for low, high in ranges) for p in network.parameters()]

    assert all(inside(loaded.diffusion, config.diffusion.weights))
    assert not any(inside(loaded.autoencoder, config.autoencoder.weights))


def test_the_memory_plan_counts_mapped_weights_as_reclaimable_only_where_they_are(saved_folder, tmp_path):
    config = load_model_folder(saved_folder).config
    base_file = (saved_folder / config.diffusion.weights).stat().st_size
    assert model_folder.mapped_weight_bytes(config, saved_folder, "cpu") == base_file
    assert model_folder.mapped_weight_bytes(config, saved_folder, "cuda") == 0  # copied to the GPU
    half = save_model_folder(tmp_path / "half", config, *tiny_networks(config), dtype=torch.float16)
    assert model_folder.mapped_weight_bytes(config, half, "cpu") == 0  # converted on loading: copied


def test_helpers_describe_conditions_and_latent(saved_folder):
    loaded = load_model_folder(saved_folder)
    assert loaded.condition_channel_names == ["background", "label 1", "label 2", "label 3", "T2"]
    assert [label.value for label in loaded.labels] == [0, 1, 2, 3]
    assert loaded.latent_shape == (3, 4, 4, 4)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model_folder(tmp_path / "nowhere")
    with pytest.raises(UserError, match="config.json is missing"):
        load_model_folder(tmp_path)


def test_missing_weights_file_is_named(saved_folder, tmp_path):
    folder = _copy(saved_folder, tmp_path / "m")
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(UserError, match="adapter.safetensors is missing"):
        load_model_folder(folder)


def test_corrupt_weights_file_is_named(saved_folder, tmp_path):
    folder = _copy(saved_folder, tmp_path / "m")
    data = (folder / "diffusion.safetensors").read_bytes()
    (folder / "diffusion.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="diffusion.safetensors is not a readable safetensors file"):
        load_model_folder(folder)


@pytest.mark.parametrize("change, message", [
    ("drop", "lacks tensor 'conv_in.conv.weight'"),
    ("reshape", r"tensor 'conv_in.conv.weight' has shape \[3, 8, 3, 3, 3\], the network expects \[8, 3"),
    ("extra", "has tensor 'zz.extra' that the network lacks"),
])
def test_mismatched_tensors_are_named(saved_folder, tmp_path, change, message):
    folder = _copy(saved_folder, tmp_path / "m")
    path = folder / "diffusion.safetensors"
    tensors = load_file(str(path))
    if change == "drop":
        del tensors["conv_in.conv.weight"]
    elif change == "reshape":
        tensors["conv_in.conv.weight"] = tensors["conv_in.conv.weight"].transpose(0, 1).contiguous()
    else:
        tensors["zz.extra"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=message) as raised:
        load_model_folder(folder)
    assert str(raised.value).startswith(f"weights file {path}")
    assert str(raised.value).endswith("does not match config.json; re-download the model or fix config.json")


def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        if value is _DELETE:
            del data[last]
        else:
            data[last] = value
    return edit


_DELETE = object()


@pytest.mark.parametrize("edit, field", [
    (_set("grid", _DELETE), "'grid' is missing"),
    (_set("grid.size", [16, 16]), "'grid.size' must be 3 positive integers"),
    (_set("grid.orientation", "RAR"), "'grid.orientation'"),
    (_set("task", "painting"), "'task' must be one of"),
    (_set("format_version", 7), "'format_version' is 7"),
    (_set("intensity.range", [1.0, 0.0]), "'intensity.range'"),
    (_set("autoencoder.weights", "../escape.safetensors"), "'autoencoder.weights' must be"),
    (_set("latent.scale_factor", -1), "'latent.scale_factor' must hold positive numbers"),
    (_set("scheduler.schedule", "wiggly"), "'scheduler.schedule'"),
    (_set("sampling.steps", 0), "'sampling.steps'"),
    (_set("sampling.scheduler", "euler"), "'sampling.scheduler' must be one of ddim, ddpm, dpmpp-2m"),
    (_set("diffusion.params.in_channels", 4), "'diffusion.params.in_channels' must be latent channels"),
    (_set("adapter.params.condition_channels", 2), "'adapter.params.condition_channels' must equal"),
    (_set("conditions.labels.table", [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]),
     "repeats a label value"),
    (_set("grid.size", [20, 16, 16]), "'grid.size' must be divisible by 8"),
    (_set("colour", "blue"), "'colour' is not a known field"),
    (_set("autoencoder.params.norm_num_groups", 3), "'autoencoder.params' does not build a AutoencoderKL"),
    (_set("scheduler.beta_end", 5.0), "'scheduler.beta_end' must be below 1"),
    (_set("scheduler.beta_end", 0.001), "'scheduler.beta_end' must be below 1 and at least beta_start"),
    (_set("scheduler.num_train_timesteps", 10**12), "'scheduler.num_train_timesteps' must be at most"),
    (_set("diffusion.params.num_res_blocks", 10**9), "'diffusion.params.num_res_blocks' holds 1000000000"),
    (_set("conditions.labels.table", [{"value": 2**40, "name": "a"}]), r"value' must be at most 2147483647"),
])
def test_bad_config_fields_are_named(saved_folder, tmp_path, edit, field):
    folder = _copy(saved_folder, tmp_path / "m")
    _edit_config(folder, edit)
    with pytest.raises(UserError, match=field) as raised:
        load_model_folder(folder)
    message = str(raised.value)
    assert "\n" not in message and str(folder / CONFIG_NAME) in message


def test_invalid_json_is_reported_with_its_line(saved_folder, tmp_path):
    folder = _copy(saved_folder, tmp_path / "m")
    (folder / CONFIG_NAME).write_text('{\n "name": "x",\n oops\n}')
    with pytest.raises(UserError, match="not valid JSON \\(line 3"):
        load_model_folder(folder)


def test_save_replaces_an_existing_folder_only_when_complete(tmp_path, monkeypatch):
    folder = make_tiny_model_folder(tmp_path / "model", seed=1)
    before = {item.name: item.read_bytes() for item in folder.iterdir()}
    config = tiny_config(name="model")
    networks = tiny_networks(config, seed=2)

    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(model_folder, "save_file", failing_save)
    with pytest.raises(UserError, match="cannot write .*model': the disk is full .*left as it was"):
        save_model_folder(folder, config, *networks)
    assert {item.name: item.read_bytes() for item in folder.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["model"]

    monkeypatch.setattr(model_folder, "save_file", save_file)
    save_model_folder(folder, config, *networks, model_card="# replaced\n")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert (folder / "README.md").read_text() == "# replaced\n"
    loaded = load_model_folder(folder)
    assert torch.equal(loaded.diffusion.conv_in.conv.weight, networks[1].conv_in.conv.weight)


def test_base_only_model_has_no_adapter(tmp_path):
    folder = make_tiny_model_folder(tmp_path / "base", with_adapter=False, labels=None, modalities=None)
    loaded = load_model_folder(folder)
    assert loaded.adapter is None and loaded.condition_channel_names == []
    assert not (folder / "adapter.safetensors").exists()


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def test_share_base_stores_the_base_once_in_half_precision(tmp_path):
    from VCMSynthesisLib.sampler import sample

    labels = make_tiny_model_folder(tmp_path / "labels", seed=3, modalities=None)
    base_networks = load_model_folder(labels)
    training = {"diffusion": {"steps": 700}, "adapter": {"steps": 1500}}
    save_model_folder(labels, replace(base_networks.config, metadata={"training": training}),
                      base_networks.autoencoder, base_networks.diffusion, base_networks.adapter)
    t2_config = tiny_config(name="t2", labels=None)
    t2 = save_model_folder(tmp_path / "t2", t2_config, base_networks.autoencoder, base_networks.diffusion,
                           tiny_networks(t2_config, 4)[2])
    condition = torch.rand(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    before = sample(load_model_folder(labels), condition, seed=1)
    size_before = _folder_bytes(labels) + _folder_bytes(t2)

    base = model_folder.share_base([labels, t2], tmp_path / "base")

    assert sorted(path.name for path in labels.iterdir()) == ["README.md", "adapter.safetensors", CONFIG_NAME]
    t2_weights = json.loads((t2 / CONFIG_NAME).read_text())["diffusion"]["weights"]
    assert t2_weights == "../base/diffusion.safetensors"
    assert load_file(str(base / "diffusion.safetensors"))["conv_in.conv.weight"].dtype == torch.float16
    assert _folder_bytes(labels) + _folder_bytes(t2) + _folder_bytes(base) < 0.6 * size_before
    shared = load_model_folder(labels)
    assert shared.diffusion.conv_in.conv.weight.dtype == torch.float32
    assert torch.allclose(sample(shared, condition, seed=1), before, atol=2e-2)
    assert load_model_folder(base).adapter is None
    # The base keeps its own training record, not the first adapter's.
    assert load_model_folder(base).config.metadata["training"] == {"diffusion": {"steps": 700}}
    assert shared.config.metadata["training"] == training


def test_share_base_refuses_models_of_different_bases(tmp_path):
    first = make_tiny_model_folder(tmp_path / "first", seed=1)
    second = make_tiny_model_folder(tmp_path / "second", seed=2)
    with pytest.raises(UserError, match="different autoencoder weights"):
        model_folder.share_base([first, second], tmp_path / "base")
    assert not (tmp_path / "base").exists()

