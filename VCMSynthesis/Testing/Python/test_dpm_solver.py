"""DPM-Solver++(2M) (`dpm_solver.py`): step by step against diffusers, exact on a consistent model."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler as DiffusersDPMSolver
from VCMSynthesisLib.checkpoints import BRAINLDM_NOISE_SCHEDULE
from VCMSynthesisLib.dpm_solver import DPMSolverMultistepScheduler
from VCMSynthesisLib.model_config import NoiseSchedule
from VCMSynthesisLib.sampler import _alpha_cumprod, _previous_timestep, build_scheduler

SCHEDULE = NoiseSchedule(**BRAINLDM_NOISE_SCHEDULE)


def solver(steps: int, **options) -> DPMSolverMultistepScheduler:
    scheduler = DPMSolverMultistepScheduler(SCHEDULE.num_train_timesteps, SCHEDULE.schedule,
                                            beta_start=SCHEDULE.beta_start,
                                            beta_end=SCHEDULE.beta_end, **options)
    scheduler.set_timesteps(steps)
    return scheduler


def noise_model(seed: int = 0):
    """A smooth, nonlinear, time-dependent noise predictor (a stand-in for a trained network)."""
    weights = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)) / 3
    return lambda z, t: torch.tanh(torch.einsum("ij,bj...->bi...", weights, z) + t / 1000)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 25])
def test_every_step_matches_diffusers_dpmsolver_plus_plus_2m(steps):
    ours = solver(steps)
    # diffusers' defaults past these: midpoint solver, "linspace" spacing, final_sigmas_type="zero"
    # (the last step is first order, to sigma 0), lower_order_final=True.
    theirs = DiffusersDPMSolver(num_train_timesteps=SCHEDULE.num_train_timesteps,
                                trained_betas=ours.betas.numpy(), algorithm_type="dpmsolver++",
                                solver_order=2, prediction_type="epsilon")
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    predict = noise_model()
    start = torch.randn(1, 3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    x_ours = x_theirs = start
    for t in ours.timesteps:
        x_ours, clean = ours.step(predict(x_ours, t), int(t), x_ours)
        x_theirs = theirs.step(predict(x_theirs, t), t, x_theirs).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clean, theirs.model_outputs[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ours, clean, rtol=0, atol=0)  # the last step lands on the clean prediction


@pytest.mark.parametrize("steps", [2, 4, 9])
def test_a_model_that_knows_the_data_is_followed_exactly(steps):
    """For a model whose noise always points at one clean sample, the ODE's solution is that sample;
    every step lands on it noised to the level `_previous_timestep` says the step goes to."""
    scheduler, timesteps = build_scheduler(SCHEDULE, "dpmpp-2m", steps)
    clean = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    x = scheduler.add_noise(clean, noise, timesteps[:1])
    for t in scheduler.timesteps:
        x, predicted = scheduler.step(noise, int(t), x)
        torch.testing.assert_close(predicted, clean, rtol=1e-4, atol=1e-4)
        previous = _previous_timestep(scheduler, int(t))
        expected = clean if previous < 0 else scheduler.add_noise(clean, noise, torch.tensor([previous]))
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)
    assert previous == -1 and float(_alpha_cumprod(scheduler, previous)) == 1.0


def test_previous_timesteps_walk_the_schedule_to_the_clean_end():
    scheduler, timesteps = build_scheduler(SCHEDULE, "dpmpp-2m", 4)
    assert timesteps.tolist() == [999, 749, 500, 250] == scheduler.timesteps.tolist()
    assert [_previous_timestep(scheduler, t) for t in timesteps.tolist()] == [749, 500, 250, -1]


def test_taking_a_step_again_reuses_the_prediction_of_the_step_before():
    """RePaint takes each step several times: the second order term must come from the step
    before, not from the first try at the same step."""
    predict = noise_model(seed=4)
    x = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    once, twice = solver(5), solver(5)
    first_t, second_t = (int(t) for t in once.timesteps[:2])
    for scheduler in (once, twice):
        scheduler.step(predict(x, first_t), first_t, x)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    twice.step(predict(other, second_t), second_t, other)  # a first try from elsewhere
    torch.testing.assert_close(twice.step(predict(x, second_t), second_t, x)[0],
                               once.step(predict(x, second_t), second_t, x)[0], rtol=0, atol=0)


def test_clip_sample_clips_the_clean_prediction():
    x = 5 * torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    scheduler = solver(3, clip_sample=True)
    _, clean = scheduler.step(torch.zeros_like(x), int(scheduler.timesteps[0]), x)
    assert clean.abs().max() == 1.0
    _, unclipped = solver(3).step(torch.zeros_like(x), int(scheduler.timesteps[0]), x)
    assert unclipped.abs().max() > 1.0
