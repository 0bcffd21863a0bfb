"""training/: tiny real runs of the trainers (loss goes down, exact resume, 2-process torchrun),
export to a model folder that the sampler runs, and the evaluation metrics on known inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import make_tiny_model_folder

TRAINING = Path(__file__).resolve().parents[3] / "training"
sys.path.insert(0, str(TRAINING))

import common  # noqa: E402
import demo  # noqa: E402
import evaluate  # noqa: E402
import export_model  # noqa: E402
import train_adapter  # noqa: E402
import train_autoencoder  # noqa: E402
import train_diffusion  # noqa: E402
from VCMSynthesisLib import sampler  # noqa: E402
from VCMSynthesisLib.checksums import Checksums  # noqa: E402
from VCMSynthesisLib.errors import UserError  # noqa: E402
from VCMSynthesisLib.model_folder import load_model_folder, save_model_folder  # noqa: E402

SIZE = 16  # voxels per side of the tiny phantoms


def phantom(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 3-tissue ball (CSF core, grey shell, white in between) with a random shift; (z, y, x) arrays."""
    grid = np.indices((SIZE,) * 3).astype(np.float32)
    centre = SIZE / 2 - 0.5 + rng.uniform(-1.0, 1.0, size=3)
    radius = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    labels = np.select([radius < 2.5, radius < 5.0, radius < 7.0], [1, 3, 2], 0).astype(np.uint8)
    t1 = np.choose(labels, [0.0, 0.3, 0.6, 0.9]).astype(np.float32) + rng.normal(0, 0.02, labels.shape)
    t2 = np.choose(labels, [0.0, 1.0, 0.55, 0.4]).astype(np.float32) + rng.normal(0, 0.02, labels.shape)
    return {"image": np.clip(t1, 0, 1).astype(np.float32), "labels": labels,
            "t2": np.abs(t2).astype(np.float32)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Six phantom cases (4 train, 2 test) as NIfTI files on a 2 mm RAS grid, with a manifest."""
    folder = tmp_path_factory.mktemp("data")
    rows = ["case,split,image,labels,t2"]
    for index in range(6):
        case = f"case{index}"
        for kind, array in phantom(np.random.default_rng(index)).items():
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
            sitk.WriteImage(image, str(folder / f"{case}_{kind}.nii.gz"))
        split = "train" if index < 4 else "test"
        rows.append(f"{case},{split},{case}_image.nii.gz,{case}_labels.nii.gz,{case}_t2.nii.gz")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


# The `adapter` section of the adapter tests' configs (VCM kwargs on the tiny base).
TINY_ADAPTER = {"encoder_channels": [8], "encoder_res_blocks": 1, "encoder_norm_groups": 4,
                "unet_channels": [8, 8], "unet_res_blocks": 1, "unet_attention_levels": [False, False],
                "unet_head_channels": [0, 8], "unet_out_channels": 8, "unet_norm_groups": 4,
                "head_channels": 8}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def autoencoder_config(manifest: Path, steps: int) -> dict:
    return {
        "data": {"manifest": str(manifest)},
        "autoencoder": {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [8, 8],
                        "latent_channels": 2, "num_res_blocks": 1, "norm_num_groups": 4,
                        "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "patch_size": 8,
        "loss": {"edge": 0.5, "kl": 1.0e-6},
        "training": {"steps": steps, "batch_size": 2, "lr": 3e-3, "log_every": 1, "checkpoint_every": 1000,
                     "threads": 1},
    }


@pytest.fixture(scope="module")
def base_runs(dataset, tmp_path_factory) -> dict[str, Path]:
    """A tiny autoencoder and diffusion model trained on the phantoms."""
    root = tmp_path_factory.mktemp("runs")
    config = write_config(root / "ae.yaml", autoencoder_config(dataset, 40))
    train_autoencoder.main(["--config", str(config), "--run-dir", str(root / "ae")])
    diffusion = {
        "data": {"manifest": str(dataset)}, "autoencoder_run": str(root / "ae"),
        "diffusion": {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "channels": [8, 8],
                      "attention_levels": [False, False], "num_head_channels": [0, 8], "num_res_blocks": 1,
                      "norm_num_groups": 4},
        "scheduler": {"num_train_timesteps": 100, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                      "beta_end": 0.0205, "clip_sample": False},
        "training": {"steps": 30, "batch_size": 4, "lr": 1e-3, "log_every": 1, "ema_decay": 0.9,
                     "threads": 1},
    }
    config = write_config(root / "dm.yaml", diffusion)
    train_diffusion.main(["--config", str(config), "--run-dir", str(root / "dm")])
    export_model.main(["base", "--autoencoder-run", str(root / "ae"), "--diffusion-run", str(root / "dm"),
                       "--out", str(root / "base")])
    return {"root": root, "ae": root / "ae", "dm": root / "dm", "base": root / "base"}


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in common.read_log(run_dir)]


def test_autoencoder_and_diffusion_losses_go_down(base_runs):
    for run in ("ae", "dm"):
        values = losses(base_runs[run])
        assert np.mean(values[-5:]) < 0.8 * np.mean(values[:5]), (run, values)


def test_resume_gives_the_same_loss_curve(dataset, tmp_path):
    config = write_config(tmp_path / "ae.yaml", autoencoder_config(dataset, 6))
    train_autoencoder.main(["--config", str(config), "--run-dir", str(tmp_path / "straight")])
    resumed = ["--config", str(config), "--run-dir", str(tmp_path / "resumed")]
    train_autoencoder.main([*resumed, "--set", "training.pause_at=3"])
    assert len(losses(tmp_path / "resumed")) == 3
    train_autoencoder.main(resumed)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    straight = load_file(str(tmp_path / "straight" / "autoencoder.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "autoencoder.safetensors"))
    assert all(torch.equal(straight[key], again[key]) for key in straight)


def test_torchrun_two_processes_average_gradients(dataset, tmp_path):
    config = write_config(tmp_path / "ae.yaml", autoencoder_config(dataset, 3))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TRAINING)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(TRAINING / "train_autoencoder.py"), "--config", str(config),
               "--run-dir", str(tmp_path / "ddp")]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # whole: a rank's own error comes before the launcher's
    assert len(losses(tmp_path / "ddp")) == 3
    train_autoencoder.main(["--config", str(config), "--run-dir", str(tmp_path / "single")])
    ddp = load_file(str(tmp_path / "ddp" / "autoencoder.safetensors"))
    single = load_file(str(tmp_path / "single" / "autoencoder.safetensors"))
    # Rank 1 draws other patches: averaged gradients give other weights than rank 0 alone.
    assert any(not torch.allclose(ddp[key], single[key]) for key in ddp)


def test_adapter_trains_exports_samples_and_continues(dataset, base_runs, tmp_path):
    config = {
        "base_model": str(base_runs["base"]),
        "conditions": {"labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "CSF"},
                                  {"value": 2, "name": "grey matter"}, {"value": 3, "name": "white matter"}],
                       "modalities": []},
        "data": {"manifest": str(dataset), "image_key": "image", "segmentation_key": "labels"},
        "adapter": TINY_ADAPTER,
        "training": {"steps": 25, "batch_size": 2, "lr": 2e-3, "log_every": 1, "threads": 1},
    }
    path = write_config(tmp_path / "adapter.yaml", config)
    train_adapter.main(["--config", str(path), "--run-dir", str(tmp_path / "adapter")])
    rows = common.read_log(tmp_path / "adapter")
    assert np.mean([r["mse"] for r in rows[-5:]]) < np.mean([r["mse"] for r in rows[:5]])
    export_model.main(["adapter", "--base", str(base_runs["base"]),
                       "--adapter-run", str(tmp_path / "adapter"), "--out", str(tmp_path / "model"),
                       "--name", "tiny", "--description", "tiny test model", "--steps", "3",
                       "--scheduler", "ddpm", "--strength", "1.5"])
    model = load_model_folder(tmp_path / "model")
    assert (model.config.sampling_steps, model.config.sampling_scheduler) == (3, "ddpm")
    assert model.config.sampling_strength == 1.5
    card = (tmp_path / "model" / "README.md").read_text()
    assert "- Default sampling: DDPM, 3 steps, condition strength 1.5" in card
    # set-sampling keeps the weights as stored, float16 ones too (as share_base.py stores them).
    card = (tmp_path / "model" / "README.md").read_text()
    save_model_folder(tmp_path / "model", model.config, model.autoencoder, model.diffusion, model.adapter,
                      model_card=card, dtype=torch.float16)
    adapter_bytes = (tmp_path / "model" / "adapter.safetensors").read_bytes()
    export_model.main(["set-sampling", "--model", str(tmp_path / "model"), "--scheduler", "dpmpp-2m",
                       "--strength", "2", "--background", "0"])
    model = load_model_folder(tmp_path / "model")
    assert (model.config.sampling_steps, model.config.sampling_scheduler) == (3, "dpmpp-2m")
    assert (model.config.sampling_strength, model.config.intensity_background) == (2.0, 0.0)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "- Default sampling: DPM-Solver++(2M), 3 steps, condition strength 2" in card
    assert (tmp_path / "model" / "adapter.safetensors").read_bytes() == adapter_bytes
    assert model.config.condition_channel_names == ["background", "CSF", "grey matter", "white matter"]
    assert "adapter" in (tmp_path / "model" / "README.md").read_text()
    case = common.read_manifest(dataset, split="test")[0]
    built = evaluate.case_conditions(model, case, {"labels": "labels"})
    image = sampler.sample(model, torch.from_numpy(built.channels)[None], seed=1)
    assert image.shape == (1, 1, SIZE, SIZE, SIZE) and torch.isfinite(image).all()

    # A new run starts from the trained weights (lr 0 keeps them), and refuses another architecture.
    trained = tmp_path / "adapter" / "adapter.safetensors"
    continued = {**config, "init_adapter": str(trained),
                 "training": {**config["training"], "steps": 4, "pause_at": 3, "log_every": 2, "lr": 0.0}}
    train_adapter.main(["--config", str(write_config(tmp_path / "continue.yaml", continued)),
                        "--run-dir", str(tmp_path / "continued")])
    before, after = load_file(str(trained)), load_file(str(tmp_path / "continued" / "adapter.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    export_model.main(["adapter", "--base", str(base_runs["base"]), "--adapter-run",
                       str(tmp_path / "continued"), "--out", str(tmp_path / "continued-model"),
                       "--name", "tiny", "--description", "tiny"])
    card = (tmp_path / "continued-model" / "README.md").read_text()
    # Stopped at step 3 with rows logged at step 2: the card counts the steps actually run.
    digest = Checksums.of_file(trained).sha256
    assert "adapter: 3 steps" in card and f"continued from `{trained}`, sha256 {digest[:16]})" in card
    wider = {**continued, "adapter": {**config["adapter"], "head_channels": 16}}
    with pytest.raises(UserError, match="init_adapter must match"):
        train_adapter.main(["--config", str(write_config(tmp_path / "wider.yaml", wider)),
                            "--run-dir", str(tmp_path / "wider")])
    missing = {**continued, "init_adapter": str(tmp_path / "no-such-adapter.safetensors")}
    with pytest.raises(UserError, match="is not a file"):
        train_adapter.main(["--config", str(write_config(tmp_path / "missing.yaml", missing)),
                            "--run-dir", str(tmp_path / "missing")])
    assert not (tmp_path / "missing").exists(), "nothing is written before the inputs are checked"


def test_adapter_options_for_slow_conditions(dataset, base_runs, tmp_path):
    """Zero heads start at the base (relative MSE exactly 1); the condition encoder fits the latent."""
    config = {
        "base_model": str(base_runs["base"]),
        "conditions": {"labels": None, "modalities": [
            {"name": "T2", "normalization": {"kind": "percentile", "low": 1.0, "high": 99.0}}]},
        "data": {"manifest": str(dataset), "image_key": "image", "modality_keys": {"T2": "t2"}},
        "adapter": {**TINY_ADAPTER, "head_norm": None},
        "relative_mse": True,
        "condition_latent_weight": 1.0,
        "sparsity_weight": 0.0,
        "training": {"steps": 25, "batch_size": 2, "lr": 2e-3, "log_every": 1, "threads": 1},
    }
    path = write_config(tmp_path / "adapter.yaml", config)
    train_adapter.main(["--config", str(path), "--run-dir", str(tmp_path / "adapter")])
    rows = common.read_log(tmp_path / "adapter")
    first = rows[0]
    assert first["mse"] == pytest.approx(first["base_mse"])
    assert first["loss"] == pytest.approx(1.0 + first["condition_latent_mse"])
    assert np.mean([r["condition_latent_mse"] for r in rows[-5:]]) < 0.5 * first["condition_latent_mse"]

    narrow = {**config, "adapter": {**config["adapter"], "encoder_channels": [1], "encoder_norm_groups": 1}}
    with pytest.raises(UserError, match="condition_latent_weight needs adapter.encoder_channels"):
        train_adapter.main(["--config", str(write_config(tmp_path / "narrow.yaml", narrow)),
                            "--run-dir", str(tmp_path / "narrow")])


def test_a_script_given_a_bad_input_prints_one_error_line_and_exits_non_zero(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(TRAINING)}
    command = [sys.executable, str(TRAINING / "train_adapter.py"), "--config", str(tmp_path / "missing.yaml"),
               "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: cannot read config")
    assert "pass an existing YAML file" in result.stderr
    assert not (tmp_path / "run").exists()


def test_set_sampling_refuses_a_superres_model_and_leaves_it_unchanged(tmp_path):
    folder = make_tiny_model_folder(tmp_path / "tiny-superres", labels=None, modalities=("thick",),
                                    task="superres")
    before = (folder / "config.json").read_bytes()
    with pytest.raises(UserError, match="re-export it with export_superres.py"):
        export_model.main(["set-sampling", "--model", str(folder), "--scheduler", "ddpm"])
    assert (folder / "config.json").read_bytes() == before


def test_set_sampling_refuses_zero_steps_and_leaves_the_model_unchanged(tmp_path, capsys):
    folder = make_tiny_model_folder(tmp_path / "tiny")
    before = (folder / "config.json").read_bytes()
    with pytest.raises(SystemExit):
        export_model.main(["set-sampling", "--model", str(folder), "--steps", "0"])
    assert "argument --steps: must be at least 1, got 0" in capsys.readouterr().err
    assert (folder / "config.json").read_bytes() == before


def test_demo_preview_letters_follow_the_grid_direction():
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # i -> L, j -> P, k -> S (LPS)
    assert [demo.axis_ends(identity, axis) for axis in range(3)] == [("R", "L"), ("A", "P"), ("I", "S")]
    # A RAS-stored NIfTI read by ITK (i -> R, j -> A) with k tilted 30 degrees towards posterior.
    tilted = (-1, 0, 0, 0, -1, 0.5, 0, 0, 0.866)
    assert [demo.axis_ends(tilted, axis) for axis in range(3)] == [("L", "R"), ("P", "A"), ("I", "S")]


def test_demo_preview_has_a_tissue_legend_below_the_slices(tmp_path):
    import matplotlib.image

    labels = np.zeros((12, 14, 16), np.int16)
    labels[2:10, 3:11, 4:12] = 3
    labels[4:8, 5:9, 6:10] = 2
    labels[5:7, 6:8, 7:9] = 1
    path = tmp_path / "preview.png"
    demo.preview({"condition": labels, "image": labels.astype(np.float32) * 300.0},
                 (1, 0, 0, 0, 1, 0, 0, 0, 1), path)
    pixels = matplotlib.image.imread(str(path))[..., :3]
    assert pixels.shape[:2] == (660, 900)
    legend = pixels[-50:]  # the strip under the slices: one swatch per tissue label
    colours = plt_colours(len(evaluate.TISSUES) + 1)
    for colour in colours:
        assert (np.abs(legend - colour).max(axis=-1) < 0.02).sum() > 20


def plt_colours(count: int) -> np.ndarray:
    import matplotlib.pyplot as plt

    return np.asarray([plt.get_cmap("viridis", count)(value)[:3] for value in range(count)])


def test_dice_of_identical_maps_is_one():
    labels = phantom(np.random.default_rng(0))["labels"]
    assert evaluate.dice_per_label(labels, labels) == {1: 1.0, 2: 1.0, 3: 1.0}
    shifted = np.roll(labels, 3, axis=0)
    assert all(score < 1.0 for score in evaluate.dice_per_label(shifted, labels).values())


def test_kmeans_recovers_the_tissues_of_a_phantom():
    case = phantom(np.random.default_rng(1))
    dice = evaluate.tissue_dice(case["image"], case["labels"])
    assert dice["mean"] > 0.99, dice
    # T2 contrast orders the tissues the other way round: the T1 classifier must then fail.
    assert evaluate.tissue_dice(case["t2"], case["labels"])["mean"] < 0.5


def test_psnr_and_ssim_known_values():
    truth = phantom(np.random.default_rng(2))["image"]
    mask = np.ones(truth.shape, dtype=bool)
    offset = truth + 0.1 * (truth.max() - truth.min())
    figures = evaluate.masked_psnr_ssim(offset, truth, mask)
    assert figures["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert evaluate.masked_psnr_ssim(truth, truth, mask)["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_histogram_matching_baseline_takes_the_reference_histogram():
    case = phantom(np.random.default_rng(3))
    matched = evaluate.histogram_matching(sitk.GetImageFromArray(case["image"] * 500.0),
                                          sitk.GetImageFromArray(case["image"]))
    assert np.abs(sitk.GetArrayFromImage(matched) - case["image"]).mean() < 0.05


def test_decoder_only_keeps_the_encoder(dataset, base_runs, tmp_path):
    config = autoencoder_config(dataset, 3)
    config.update({"init_from": str(base_runs["ae"]), "decoder_only": True, "patch_size": SIZE})
    path = write_config(tmp_path / "decoder.yaml", config)
    train_autoencoder.main(["--config", str(path), "--run-dir", str(tmp_path / "decoder")])
    before = load_file(str(base_runs["ae"] / "autoencoder.safetensors"))
    after = load_file(str(tmp_path / "decoder" / "autoencoder.safetensors"))
    frozen = [key for key in before if key.startswith(("encoder.", "quant_conv"))]
    assert frozen and all(torch.equal(before[key], after[key]) for key in frozen)
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("decoder."))


def test_a_base_counts_every_autoencoder_stage(dataset, base_runs, tmp_path):
    config = {**autoencoder_config(dataset, 2), "init_from": str(base_runs["ae"])}
    path = write_config(tmp_path / "stage2.yaml", config)
    train_autoencoder.main(["--config", str(path), "--run-dir", str(tmp_path / "stage2")])
    export_model.main(["base", "--autoencoder-run", str(tmp_path / "stage2"), "--diffusion-run",
                       str(base_runs["dm"]), "--out", str(tmp_path / "base")])
    config = load_model_folder(tmp_path / "base").config
    summary = config.metadata["training"]["autoencoder"]
    assert [stage["steps"] for stage in summary["stages"]] == [40, 2] and summary["steps"] == 42
    assert "- autoencoder: 42 steps (40 + 2), " in export_model.model_card(config, None)


def test_latent_mean_trains_a_deterministic_autoencoder(dataset, tmp_path):
    config = autoencoder_config(dataset, 3)
    config["latent"] = "mean"
    path = write_config(tmp_path / "mean.yaml", config)
    train_autoencoder.main(["--config", str(path), "--run-dir", str(tmp_path / "mean")])
    model, _ = common.load_autoencoder(tmp_path / "mean")
    image = torch.from_numpy(common.read_array(common.read_manifest(dataset)[0].files["image"]))[None, None]
    mu, sigma = model.encode(image)
    assert float(sigma.max()) < 1e-6
    assert torch.allclose(model.decode(model.sampling(mu, sigma)), model.decode(mu), atol=1e-5)
    # The logged KL counts the means only: the pinned variance alone would add ~14.5 per latent value.
    latent_values = 2 * (config["patch_size"] // 2) ** 3
    logged = [float(row["kl"]) for row in common.read_log(tmp_path / "mean")]
    assert max(logged) < 2.0 * latent_values
    typo = write_config(tmp_path / "typo.yaml", {**config, "latent": "means"})
    with pytest.raises(UserError, match="latent is 'means'; write 'latent: mean'"):
        train_autoencoder.main(["--config", str(typo), "--run-dir", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


def test_config_reads_exponent_floats_and_rejects_non_numbers(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"training": {"steps": 5}})
    path.write_text(path.read_text() + "  lr: 5e-4\n")
    config = common.load_config(path, ["training.min_lr_ratio=1e-2", "training.warmup_steps=3"])
    assert config["training"]["lr"] == 5e-4 and config["training"]["min_lr_ratio"] == 0.01
    assert config["training"]["warmup_steps"] == 3 and config["training"]["steps"] == 5
    with pytest.raises(UserError, match="training.lr is 'fast', not a number"):
        common.load_config(path, ["training.lr=fast"])


def test_evaluate_measures_a_base_model_without_conditions(dataset, base_runs, tmp_path):
    out = tmp_path / "eval.json"
    evaluate.main(["--model", str(base_runs["base"]), "--manifest", str(dataset), "--cases", "1",
                   "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["true T1", "autoencoder (ceiling)", "unguided"]
    assert rows[0]["dice mean"] > 0.9 and all(np.isfinite(row["psnr"]) for row in rows[1:])


def test_the_trainers_noise_the_latents_as_monais_ddpm_schedule_does():
    """The trainers take their scheduler from `sampler.build_scheduler` (the one place a schedule
    becomes a MONAI scheduler): its `add_noise` over every training timestep is MONAI's, bit for bit."""
    from monai.networks.schedulers import DDPMScheduler
    from VCMSynthesisLib.model_config import NoiseSchedule

    settings = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                "beta_end": 0.0205, "clip_sample": False}
    scheduler, _ = sampler.build_scheduler(NoiseSchedule(**settings), "ddpm", 1000)
    generator = torch.Generator().manual_seed(0)
    clean, noise = (torch.randn(4, 3, 8, 8, 8, generator=generator) for _ in range(2))
    timesteps = torch.tensor([0, 1, 500, 999])
    expected = DDPMScheduler(**settings).add_noise(clean, noise, timesteps)
    assert torch.equal(scheduler.add_noise(clean, noise, timesteps), expected)
