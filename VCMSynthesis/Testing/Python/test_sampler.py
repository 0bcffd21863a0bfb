"""The modulated sampler on tiny random models: determinism, exact unguided equivalence, schedulers."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler
from tiny_models import TINY_STEPS, make_tiny_model_folder
from VCMSynthesisLib.errors import Cancelled, UserError
from VCMSynthesisLib.model_config import NoiseSchedule
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.networks import VCM, modulate
from VCMSynthesisLib.sampler import KnownLatent, SamplingStats, build_scheduler, sample

COVARIATES = ("sex", "age", "ventricular_volume", "brain_volume")
SCHEDULERS = ("ddim", "ddpm", "dpmpp-2m")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model_folder(make_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="module")
def condition():
    return torch.rand(1, 5, 16, 16, 16, generator=torch.Generator().manual_seed(7))


def test_full_tiny_run_reports_progress_and_timings(model, condition):
    calls = []
    stats = SamplingStats()
    image = sample(model, condition, seed=0, stats=stats,
                   progress=lambda step, total: calls.append((step, total)))
    assert image.shape == (1, 1, 16, 16, 16) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert torch.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0
    assert not image.is_inference()  # usable by callers outside inference mode (e.g. in-place ops)
    image += 0
    assert calls == [(step, TINY_STEPS) for step in range(1, TINY_STEPS + 1)]
    assert stats.steps == TINY_STEPS
    assert stats.base_s > 0 and stats.adapter_s > 0 and stats.decoder_s > 0
    assert stats.model_s == pytest.approx(stats.base_s + stats.adapter_s + stats.decoder_s)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_fixed_seed_gives_identical_output(model, condition, scheduler):
    first = sample(model, condition, steps=4, seed=11, scheduler=scheduler)
    again = sample(model, condition, steps=4, seed=11, scheduler=scheduler)
    other = sample(model, condition, steps=4, seed=12, scheduler=scheduler)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_schedulers_take_different_paths(model, condition):
    ddim, ddpm, dpm = (sample(model, condition, steps=4, seed=5, scheduler=name) for name in SCHEDULERS)
    assert not torch.equal(ddim, ddpm) and not torch.equal(ddim, dpm) and not torch.equal(ddpm, dpm)


# Sums of images sampled before DPM-Solver++ was added (commit 184879a, tiny model seed 0,
# condition seed 7, seed 11, 4 steps): sum, sum weighted by voxel index / (count - 1), sum of squares.
IMAGES_BEFORE = {
    "ddim": (748.1279763414059, 370.07373014395455, 458.50466821831293),
    "ddpm": (730.5605826436076, 364.9129750790386, 444.3751155337912),
    "ddpm-inpainted": (701.2269008359872, 306.71407853301287, 409.5934404318019),
}


@pytest.mark.parametrize("case", IMAGES_BEFORE)
def test_a_seed_gives_the_image_it_gave_before_dpm_solver(model, condition, case):
    """Same seed, steps and config: DDIM and DDPM give the images they gave (bit for bit on the
    machine that computed them; a float32 rounding's worth elsewhere)."""
    scheduler = case.split("-")[0]
    known = None
    if case.endswith("inpainted"):
        mask = torch.zeros(1, 1, *model.config.latent_shape[1:])
        mask[..., :2, :, :] = 1.0
        known = known_latent(model, mask, resample=2)
    image = sample(model, condition, steps=4, seed=11, scheduler=scheduler, known=known)
    image = image[0, 0].double().flatten()
    weights = torch.linspace(0, 1, image.numel(), dtype=torch.float64)
    sums = (float(image.sum()), float((image * weights).sum()), float((image * image).sum()))
    assert sums == pytest.approx(IMAGES_BEFORE[case], rel=1e-6)


def test_one_dpm_solver_step_is_one_ddim_step(model, condition):
    """From pure noise to the clean end in one step, both return the model's clean prediction."""
    torch.testing.assert_close(sample(model, condition, steps=1, seed=5, scheduler="dpmpp-2m"),
                               sample(model, condition, steps=1, seed=5, scheduler="ddim"))


def test_dpm_solver_gets_closer_to_the_ode_solution_than_ddim_in_as_many_steps(model, condition):
    """Both solve the same ODE; DPM-Solver++(2M) is second order, DDIM first order."""
    solution = sample(model, condition, steps=500, seed=3, scheduler="ddim")
    for steps in (4, 8):
        ddim, dpm = (sample(model, condition, steps=steps, seed=3, scheduler=name)
                     for name in ("ddim", "dpmpp-2m"))
        assert (dpm - solution).abs().mean() < 0.95 * (ddim - solution).abs().mean()


def test_preview_shows_the_clean_prediction_and_the_last_is_the_result(model, condition, monkeypatch):
    seen = decoded_latents(model, monkeypatch)
    previews = []
    sample(model, condition, steps=4, seed=6, scheduler="dpmpp-2m",
           preview=lambda step, total, clean: previews.append((step, total, clean.clone())))
    assert [(step, total) for step, total, _ in previews] == [(step, 4) for step in range(1, 5)]
    assert not torch.equal(previews[0][2], previews[-1][2])
    torch.testing.assert_close(previews[-1][2], seen[0])


def test_guidance_changes_the_sample(model, condition):
    guided = sample(model, condition, seed=3)
    unguided = sample(model, None, seed=3, guided=False)
    assert not torch.equal(guided, unguided)


def test_strength_scales_the_modulation(model, condition):
    """w = 0 is the frozen base alone, w = 1 the model's default, and w changes the sample."""
    unguided = sample(model, None, seed=3, guided=False)
    assert torch.equal(sample(model, condition, seed=3, strength=0.0), unguided)
    assert model.config.sampling_strength == 1.0
    assert torch.equal(sample(model, condition, seed=3, strength=1.0), sample(model, condition, seed=3))
    assert not torch.equal(sample(model, condition, seed=3, strength=2.0), sample(model, condition, seed=3))


@pytest.mark.parametrize("strength", [-0.5, 4.5, float("nan"), float("inf")])
def test_strength_out_of_range_is_refused_in_one_line(model, condition, strength):
    with pytest.raises(UserError, match="strength must be between 0 and 4") as error:
        sample(model, condition, seed=3, strength=strength)
    assert "\n" not in str(error.value)


def test_modulate_is_the_papers_rule_times_the_strength():
    eps, gamma, beta = (torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(k))
                        for k in range(3))
    assert torch.allclose(modulate(eps, gamma, beta), eps * (1 + gamma) + beta)
    assert torch.allclose(modulate(eps, gamma, beta, 0.5), eps * (1 + 0.5 * gamma) + 0.5 * beta)
    assert torch.equal(modulate(eps, gamma, beta, 0.0), eps)


def test_condition_encoded_once_per_run_gives_the_per_step_result(model, condition, monkeypatch):
    adapter = model.adapter
    encoder_calls = []
    handle = adapter.condition_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        cached = sample(model, condition, steps=4, seed=2)
        assert len(encoder_calls) == 1

        def encode_every_step(x, encoded_condition, timesteps, context=None):
            return VCM.modulation(adapter, x, adapter.encode_condition(condition), timesteps, context)

        monkeypatch.setattr(adapter, "modulation", encode_every_step)
        per_step = sample(model, condition, steps=4, seed=2)
    finally:
        handle.remove()
    assert len(encoder_calls) == 1 + 1 + 4  # the per-step run still encodes once up front, unused
    assert torch.equal(cached, per_step)


def test_zeroed_heads_reproduce_unguided_sampling_exactly(tmp_path, condition):
    model = load_model_folder(make_tiny_model_folder(tmp_path / "zeroed", seed=4))
    with torch.no_grad():
        for head in (model.adapter.gamma_head, model.adapter.beta_head):
            for parameter in head.parameters():
                parameter.zero_()
    for scheduler in SCHEDULERS:
        guided = sample(model, condition, steps=4, seed=9, scheduler=scheduler)
        unguided = sample(model, None, steps=4, seed=9, scheduler=scheduler, guided=False)
        assert torch.equal(guided, unguided)


def test_full_length_ddpm_is_monai_ddpm():
    settings = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta",
                "beta_start": 0.0015, "beta_end": 0.0205, "clip_sample": False}
    scheduler, timesteps = build_scheduler(NoiseSchedule(**settings), "ddpm", 1000)
    reference = DDPMScheduler(**settings)
    assert torch.equal(timesteps, torch.arange(999, -1, -1))
    torch.testing.assert_close(scheduler.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.betas, reference.betas, rtol=0, atol=1e-6)


def test_respaced_ddpm_keeps_the_trained_noise_levels():
    schedule = NoiseSchedule(1000, "scaled_linear_beta", 0.0015, 0.0205, False)
    scheduler, timesteps = build_scheduler(schedule, "ddpm", 10)
    trained = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205)
    assert timesteps[0] == 999 and timesteps[-1] == 0 and len(timesteps) == 10
    torch.testing.assert_close(scheduler.alphas_cumprod, trained.alphas_cumprod[timesteps.flip(0)])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cancel_between_steps(model, condition, scheduler):
    calls = []
    checks = iter([False, False, True])
    with pytest.raises(Cancelled):
        sample(model, condition, steps=TINY_STEPS, scheduler=scheduler, progress=lambda s, t: calls.append(s),
               should_cancel=lambda: next(checks))
    assert calls == [1, 2]


def test_bad_arguments(model, condition):
    with pytest.raises(UserError, match="steps must be between 1 and 1000, got 0"):
        sample(model, condition, steps=0)
    with pytest.raises(UserError, match="unknown scheduler 'euler'; use one of ddim, ddpm, dpmpp-2m"):
        sample(model, condition, scheduler="euler")
    with pytest.raises(ValueError, match=r"condition must have shape \(1, 5, 16, 16, 16\)"):
        sample(model, condition[:, :4])
    with pytest.raises(UserError, match="takes no covariates"):
        sample(model, condition, covariates=[1.0])


def test_base_covariates_go_to_channels_and_context(tmp_path, condition):
    model = load_model_folder(make_tiny_model_folder(tmp_path / "cov", covariates=COVARIATES))
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].clone(), kwargs["context"].clone()))

    handle = model.diffusion.register_forward_pre_hook(record, with_kwargs=True)
    try:
        covariates = [1.0, 0.6, 0.2, 0.8]
        first = sample(model, condition, steps=2, seed=1, covariates=covariates)
    finally:
        handle.remove()
    assert len(seen) == 2
    for base_input, context in seen:
        assert base_input.shape == (1, 3 + 4, 4, 4, 4)
        assert torch.equal(base_input[0, 3:, 1, 2, 3], torch.tensor(covariates))
        assert torch.equal(base_input[0, 3:].amax((1, 2, 3)), base_input[0, 3:].amin((1, 2, 3)))
        assert torch.equal(context, torch.tensor(covariates).view(1, 1, 4))

    assert torch.equal(first, sample(model, condition, steps=2, seed=1, covariates=covariates))
    assert not torch.equal(first, sample(model, condition, steps=2, seed=1, covariates=[0.0, 0.3, 0.5, 0.5]))
    assert sample(model, condition, steps=2, seed=1).shape == first.shape  # config defaults
    with pytest.raises(UserError, match="takes 4 covariates"):
        sample(model, condition, covariates=[1.0, 2.0])


# --- latent inpainting ------------------------------------------------------------------------


def known_latent(model, mask, resample=1):
    latent = torch.randn(1, *model.config.latent_shape, generator=torch.Generator().manual_seed(3))
    return KnownLatent(latent=latent, mask=mask, resample=resample)


def decoded_latents(model, monkeypatch):
    """The latents (times `scale_factor`) `sample` hands to the decoder, recorded."""
    seen = []
    decode = model.decode

    def recording(latent):
        seen.append(latent.clone())
        return decode(latent)

    monkeypatch.setattr(model, "decode", recording)
    return seen


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_keeps_the_known_latent_outside_the_mask(model, condition, monkeypatch, scheduler):
    mask = torch.zeros(1, 1, *model.config.latent_shape[1:])
    mask[..., :2, :, :] = 1.0
    known = known_latent(model, mask)
    seen = decoded_latents(model, monkeypatch)
    inpainted = sample(model, condition, seed=1, scheduler=scheduler, known=known)
    plain = sample(model, condition, seed=1, scheduler=scheduler)
    final = seen[0]
    kept = mask.expand_as(final) == 0
    torch.testing.assert_close(final[kept], known.latent[kept], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(final[~kept], known.latent[~kept], atol=1e-3)  # the masked part is drawn
    assert not torch.equal(inpainted, plain)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_inpainting_with_a_full_mask_is_plain_sampling(model, condition, scheduler):
    """DDIM and DPM-Solver++ draw no noise per step: generating everywhere gives exactly the plain sample."""
    full = known_latent(model, torch.ones(1, 1, *model.config.latent_shape[1:]))
    torch.testing.assert_close(sample(model, condition, seed=2, scheduler=scheduler, known=full),
                               sample(model, condition, seed=2, scheduler=scheduler), rtol=0, atol=0)


def test_inpainting_with_an_empty_mask_decodes_the_known_latent(model, condition):
    known = known_latent(model, torch.zeros(1, 1, *model.config.latent_shape[1:]))
    image = sample(model, condition, seed=4, scheduler="ddpm", known=known)
    with torch.inference_mode():
        expected = model.autoencoder.decode(known.latent / model.config.scale_factor).clamp(0.0, 1.0)
    torch.testing.assert_close(image, expected)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_resampling_repeats_each_step_and_reports_steps_once(model, condition, scheduler):
    mask = torch.zeros(1, 1, *model.config.latent_shape[1:])
    mask[..., 0, 0, 0] = 1.0
    calls = []
    stats = SamplingStats()
    once = sample(model, condition, seed=5, scheduler=scheduler, known=known_latent(model, mask))
    thrice = sample(model, condition, seed=5, scheduler=scheduler,
                    known=known_latent(model, mask, resample=3), stats=stats,
                    progress=lambda step, total: calls.append((step, total)))
    assert calls == [(step, TINY_STEPS) for step in range(1, TINY_STEPS + 1)]
    assert stats.steps == 3 * TINY_STEPS
    assert not torch.equal(once, thrice)


def test_inpainting_refuses_a_latent_of_the_wrong_shape(model, condition):
    wrong = KnownLatent(latent=torch.zeros(1, 1, 4, 4, 4), mask=torch.ones(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="known latent must have shape"):
        sample(model, condition, known=wrong)
