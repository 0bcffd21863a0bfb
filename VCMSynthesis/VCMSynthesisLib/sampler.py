"""The modulated denoising loop: a frozen latent diffusion model steered by VCM.

At every step the frozen base model predicts noise eps_t, VCM reads (z_t, eps_t, condition, t)
and returns per-voxel (gamma_t, beta_t), and the scheduler steps with
eps' = eps_t * (1 + gamma_t) + beta_t. VCM's condition encoder is time-free, so the condition is
encoded once per run. The loop is written out in one function, as in
diffusers, so that it can be read top to bottom.

Given a `KnownLatent`, the loop inpaints (blended latent diffusion, Avrahami et al. 2023;
RePaint, Lugmayr et al. 2022): after every step, outside the mask, z_t is replaced by the known
clean latent noised to that step's level, so the generated part grows into the kept one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from VCMSynthesisLib.dpm_solver import DPMSolverMultistepScheduler
from VCMSynthesisLib.errors import Cancelled, UsageError, UserError
from VCMSynthesisLib.model_config import MAX_STRENGTH, SAMPLING_SCHEDULERS, NoiseSchedule
from VCMSynthesisLib.model_folder import LoadedModel
from VCMSynthesisLib.networks import modulate


@dataclass
class SamplingStats:
    """Seconds spent in each network's forward passes during one `sample` call.

    The worker compares their sum with its wall time to measure its own overhead.
    """

    base_s: float = 0.0
    adapter_s: float = 0.0
    decoder_s: float = 0.0
    steps: int = 0

    @property
    def model_s(self) -> float:
        return self.base_s + self.adapter_s + self.decoder_s


@dataclass(frozen=True)
class KnownLatent:
    """What latent inpainting keeps: a clean latent, and the part of it the sampler redraws.

    Args:
        latent: `(1, *model.latent_shape)` the encoded image, already times `scale_factor`.
        mask: broadcastable to `latent`, e.g. `(1, 1, *latent grid)`: 1 where the sampler
            generates, 0 where it keeps `latent` (values between blend the two).
        resample: RePaint's resampling: each step is taken this many times, the result noised
            back to the step's level in between, so the generated part can agree with the kept
            one (1 = plain blended diffusion; the cost grows linearly).
    """

    latent: torch.Tensor
    mask: torch.Tensor
    resample: int = 1


Sampler = Union[DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler]


def build_scheduler(schedule: NoiseSchedule, kind: str, steps: int) -> tuple[Sampler, torch.Tensor]:
    """Builds the sampling scheduler for `steps` steps.

    Returns the scheduler and the timesteps the networks see at each step. MONAI's DDPM steps
    from t to t - 1, so DDPM with fewer steps than training uses the respaced schedule (Nichol
    and Dhariwal 2021): betas recomputed between the kept timesteps, the scheduler stepping over
    indices while the networks see the original timesteps. "dpmpp-2m" is DPM-Solver++(2M)
    (`dpm_solver.py`), deterministic like DDIM and good at few steps.
    """
    if kind not in SAMPLING_SCHEDULERS:
        raise UserError(f"unknown scheduler {kind!r}; use one of {', '.join(SAMPLING_SCHEDULERS)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise UserError(f"steps must be between 1 and {schedule.num_train_timesteps}, got {steps}")
    args = dict(num_train_timesteps=schedule.num_train_timesteps, schedule=schedule.schedule,
                beta_start=schedule.beta_start, beta_end=schedule.beta_end, clip_sample=schedule.clip_sample)
    if kind in ("ddim", "dpmpp-2m"):
        scheduler = (DDIMScheduler if kind == "ddim" else DPMSolverMultistepScheduler)(**args)
        scheduler.set_timesteps(steps)
        return scheduler, scheduler.timesteps.clone()
    trained = DDPMScheduler(**args)
    trained.set_timesteps(steps)
    model_timesteps = trained.timesteps.clone()
    kept = trained.alphas_cumprod[model_timesteps.flip(0)]
    scheduler = DDPMScheduler(**{**args, "num_train_timesteps": steps})
    scheduler.alphas_cumprod = kept
    scheduler.alphas = kept / torch.cat([kept.new_ones(1), kept[:-1]])
    scheduler.betas = 1.0 - scheduler.alphas
    scheduler.set_timesteps(steps)
    return scheduler, model_timesteps


def check_strength(strength: float) -> float:
    """A condition strength a user gave: a finite number in [0, MAX_STRENGTH]."""
    if not 0.0 <= strength <= MAX_STRENGTH:  # NaN fails both comparisons
        raise UserError(f"strength must be between 0 and {MAX_STRENGTH:g}, got {strength}; 1 is the "
                        "strength the adapter was trained at")
    return float(strength)


def _previous_timestep(scheduler: Sampler, timestep: int) -> int:
    """The timestep `scheduler.step(..., timestep, ...)` steps to; negative at the clean end."""
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return scheduler.previous_timestep(timestep)
    if isinstance(scheduler, DDIMScheduler):
        return timestep - scheduler.num_train_timesteps // scheduler.num_inference_steps
    return timestep - 1  # MONAI's DDPM (and the respaced one) steps over consecutive indices


def _alpha_cumprod(scheduler: Sampler, timestep: int) -> torch.Tensor:
    """The signal level alpha-bar at `timestep` (1 at the clean end, as every scheduler takes it)."""
    return scheduler.alphas_cumprod[timestep] if timestep >= 0 else torch.tensor(1.0)


class _Timer:
    """Adds the wall time of a block to a `SamplingStats` field (synchronising CUDA first)."""

    def __init__(self, stats: SamplingStats | None, device: torch.device):
        self.stats = stats
        self.sync = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, field: str):
        if self.stats is None:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        setattr(self.stats, field, getattr(self.stats, field) + time.perf_counter() - start)


def _covariate_tensor(model: LoadedModel, covariates: Sequence[float] | None, device: torch.device):
    spec = model.config.covariates
    if spec is None:
        if covariates is not None:
            raise UserError(f"model {model.config.name!r} takes no covariates; leave them out")
        return None
    values = spec.default if covariates is None else tuple(covariates)
    if len(values) != len(spec.names):
        raise UserError(f"model {model.config.name!r} takes {len(spec.names)} covariates "
                        f"({', '.join(spec.names)}), got {len(values)}")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 1, -1)


def sample(
    model: LoadedModel,
    condition: torch.Tensor | None,
    *,
    steps: int | None = None,
    seed: int = 0,
    guided: bool = True,
    covariates: Sequence[float] | None = None,
    scheduler: str | None = None,
    strength: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    stats: SamplingStats | None = None,
    known: KnownLatent | None = None,
    preview: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Samples one image, steered by `condition` through the model's adapter.

    Args:
        model: a loaded model folder; sampling runs on `model.device`.
        condition: `(1, C, *grid.size)` float32 condition channels on the model grid, or None
            for unguided sampling.
        steps: denoising steps (default: the model's `sampling.steps`).
        seed: the same seed gives the same image on the same device.
        guided: False samples the frozen base model alone (for comparison).
        covariates: the base model's covariates in config order (default: the config's).
        scheduler: a key of `model_config.SAMPLING_SCHEDULERS`: "ddim", "ddpm" or "dpmpp-2m"
            (default: the model's `sampling.scheduler`).
        strength: condition strength w, eps' = eps (1 + w gamma) + w beta (default: the model's
            `sampling.strength`; `networks.modulate`).
        progress: called as `progress(step, total)` after each denoising step.
        should_cancel: checked before each step and before decoding; True raises `Cancelled`.
        stats: if given, receives the seconds spent in each network's forward passes.
        known: inpaint: keep this latent outside its mask (see `KnownLatent`); None draws all.
        preview: called as `preview(step, total, x0)` after each step with the scheduler's
            prediction of the clean latent (times `scale_factor`; `decode_latent` makes it an image).

    Returns:
        The decoded image `(1, 1, *grid.size)`, float32 on the CPU, clipped to the model's
        intensity range.
    """
    config = model.config
    device = model.device
    use_adapter = guided and model.adapter is not None
    if use_adapter:
        expected = (1, len(config.condition_channel_names), *config.grid.size)
        if condition is None or tuple(condition.shape) != expected:
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"condition must have shape {expected} for model {config.name!r}, got {got}")
        condition = condition.to(device=device, dtype=torch.float32)
    if known is not None:
        if tuple(known.latent.shape) != (1, *config.latent_shape) or known.resample < 1:
            raise ValueError(f"known latent must have shape {(1, *config.latent_shape)} and resample >= 1, "
                             f"got {tuple(known.latent.shape)} and {known.resample}")
    steps = config.sampling_steps if steps is None else steps
    strength = config.sampling_strength if strength is None else check_strength(strength)
    noise_scheduler, model_timesteps = build_scheduler(
        config.noise_schedule, scheduler or config.sampling_scheduler, steps)
    context = _covariate_tensor(model, covariates, device)
    adapter_reads_context = use_adapter and model.adapter.params.get("unet_cross_attention_dim") is not None
    adapter_context = context if adapter_reads_context else None
    generator = torch.Generator(device=device).manual_seed(seed)
    timer = _Timer(stats, device)
    autocast = (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda"
                else contextlib.nullcontext())

    with torch.inference_mode(), autocast:
        latent = torch.randn((1, *config.latent_shape), generator=generator, device=device)
        if use_adapter:
            with timer("adapter_s"):  # the encoder is time-free: once per run, not per step
                encoded_condition = model.adapter.encode_condition(condition)
        covariate_channels = None if context is None else context.view(1, -1, 1, 1, 1).expand(
            -1, -1, *latent.shape[2:])
        if known is not None:
            known_latent = known.latent.to(device=device, dtype=latent.dtype)
            generate = known.mask.to(device=device, dtype=latent.dtype)
        total = len(model_timesteps)
        if len(noise_scheduler.timesteps) != total:  # zip would drop steps silently
            raise RuntimeError(f"scheduler has {len(noise_scheduler.timesteps)} timesteps for {total} steps")
        step_pairs = _repeated(zip(noise_scheduler.timesteps, model_timesteps),
                               1 if known is None else known.resample)
        for step, (scheduler_t, model_t), again in step_pairs:
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            timesteps = torch.full((1,), int(model_t), device=device, dtype=torch.long)
            base_input = latent if covariate_channels is None else torch.cat([latent, covariate_channels], 1)
            with timer("base_s"):
                noise = model.diffusion(base_input, timesteps, context=context).float()
            if use_adapter:
                with timer("adapter_s"):
                    gamma, beta = model.adapter.modulation(torch.cat([latent, noise], 1), encoded_condition,
                                                           timesteps, context=adapter_context)
                noise = modulate(noise, gamma.float(), beta.float(), strength)
            latent, predicted_clean = noise_scheduler.step(noise, int(scheduler_t), latent,
                                                           generator=generator)
            if stats is not None:
                stats.steps += 1
            if known is not None:
                latent = _keep_known(noise_scheduler, int(scheduler_t), latent, known_latent, generate,
                                     generator)
                if again:  # RePaint: noise back to this step's level and take the step again
                    latent = _noise_back(noise_scheduler, int(scheduler_t), latent, generator)
                    continue
            if progress is not None:
                progress(step, total)
            if preview is not None:
                preview(step, total, predicted_clean)
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        with timer("decoder_s"):
            image = model.decode(latent).float()
    if not torch.isfinite(image).all():  # clamp keeps NaN: it must never reach a file
        raise UserError(f"model {config.name!r} produced NaN or infinite values: its weights or its noise "
                        f"schedule ('scheduler' in {model.folder}/config.json) are broken, or half precision "
                        "overflowed on the GPU (try --device cpu)")
    low, high = config.intensity_range
    return image.clamp(low, high).cpu()


def decode_latent(model: LoadedModel, latent: torch.Tensor) -> np.ndarray:
    """A latent (times `scale_factor`, e.g. a preview's predicted clean latent) as an image
    `[i, j, k]` on the model grid, clipped to the model's intensity range, as `sample` decodes."""
    with torch.inference_mode():
        image = model.decode(latent).float()
    low, high = model.config.intensity_range
    return image.clamp(low, high)[0, 0].cpu().numpy()


def _repeated(step_pairs, rounds: int):
    """(step number, pair, whether the step is taken again) for each step, `rounds` times each."""
    for step, pair in enumerate(step_pairs, start=1):
        for round_ in range(1, rounds + 1):
            yield step, pair, round_ < rounds


def _keep_known(scheduler, timestep: int, stepped: torch.Tensor, known: torch.Tensor, generate: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """`stepped` where the mask generates; elsewhere `known` noised to the level stepped to."""
    previous = _previous_timestep(scheduler, timestep)
    if previous >= 0:
        noise = torch.randn(known.shape, generator=generator, device=known.device, dtype=known.dtype)
        known = scheduler.add_noise(known, noise, torch.tensor([previous], device=known.device))
    return generate * stepped + (1 - generate) * known


def _noise_back(scheduler, timestep: int, stepped: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample at `timestep` drawn from q(z_t | z_previous), for a RePaint resampling round."""
    ratio = float(_alpha_cumprod(scheduler, timestep) / _alpha_cumprod(scheduler, _previous_timestep(
        scheduler, timestep)))
    noise = torch.randn(stepped.shape, generator=generator, device=stepped.device, dtype=stepped.dtype)
    return ratio**0.5 * stepped + (1 - ratio) ** 0.5 * noise


def sample_spread(
    draw: Callable[[int, Callable[[int, int], None]], np.ndarray],
    *,
    samples: int,
    steps: int,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and per-voxel standard deviation of `samples` draws with seeds `seed`, `seed + 1`, ...

    The mean of several draws estimates the posterior mean; their spread shows where the model
    is unsure. `draw(seed, progress)` makes one sample (an array) and reports its `steps` steps to
    the `progress` it is given; they reach `progress` counted over all samples.
    """
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    total = samples * steps
    drawn = []
    for index in range(samples):
        def sample_progress(step: int, _total: int, done: int = index * steps) -> None:
            if progress is not None:
                progress(done + step, total)

        drawn.append(draw(seed + index, sample_progress))
    stack = np.stack(drawn)
    return stack.mean(axis=0), stack.std(axis=0)
