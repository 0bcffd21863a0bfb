"""The project's model format: a folder with `config.json`, safetensors weights and a model card.

`config.json` is described in DEVELOPERS.md. It is parsed into a `ModelConfig` whose every field
is checked, so that a hand-edited or truncated file fails with one line naming the file and the
field instead of a traceback deep inside MONAI. Weights are safetensors (no pickle), loaded
strictly (`load_state_strict`, also used for third-party checkpoints): a missing, extra or
mis-shaped tensor is an error naming the file and the tensor.
Folders are written beside the target and renamed into place, so a crash never leaves half a
model where a complete one was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.files import atomic_path
from VCMSynthesisLib.volumes import LABEL_MAX

FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kB
# Sizes past these are typing mistakes (or hostile files); they must fail before anything is
# allocated. A network integer (channels, blocks) above MAX_NETWORK_INTEGER is refused outright.
MAX_TRAIN_TIMESTEPS = 100_000
MAX_NETWORK_INTEGER = 1 << 16
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
TASKS = ("synthesis", "translation", "superres")
SAMPLING_SCHEDULERS = ("ddim", "ddpm")
NOISE_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta")
_TOP_LEVEL_FIELDS = (
    "format_version", "name", "task", "description", "grid", "intensity", "autoencoder", "diffusion",
    "adapter", "latent", "scheduler", "sampling", "conditions", "metadata",
)


class _Fields:
    """Typed access to one JSON object of config.json; every failure names the file and field."""

    def __init__(self, data: Any, source: str, prefix: str = ""):
        self.source = source
        self.prefix = prefix
        if not isinstance(data, dict):
            self.fail("", f"must be a JSON object, got {type(data).__name__}")
        self.data = data

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str):
        where = self.path(key) if key else (self.prefix or "top level")
        raise UserError(f"{self.source}: field '{where}' {problem}; fix the model's {CONFIG_NAME}")

    def raw(self, key: str, *, optional: bool = False) -> Any:
        if key not in self.data or (optional and self.data[key] is None):
            if optional:
                return None
            self.fail(key, "is missing")
        return self.data[key]

    def obj(self, key: str, *, optional: bool = False) -> _Fields | None:
        value = self.raw(key, optional=optional)
        return None if value is None else _Fields(value, self.source, self.path(key))

    def string(self, key: str, *, choices: tuple[str, ...] | None = None, allow_empty: bool = False) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            self.fail(key, f"must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, *, minimum: int | None = None) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            self.fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, *, positive: bool = False) -> float:
        return _number(self, key, self.raw(key), positive)

    def boolean(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def numbers(self, key: str, *, count: int | None = None, positive: bool = False) -> tuple[float, ...]:
        value = self.raw(key)
        if not isinstance(value, list) or (count is not None and len(value) != count):
            self.fail(key, f"must be a list of {count or 'some'} numbers, got {value!r}")
        return tuple(_number(self, key, item, positive) for item in value)

    def weights_file(self, key: str) -> str:
        name = self.string(key)
        parts = Path(name).parts
        own = len(parts) == 1
        shared = len(parts) == 3 and parts[0] == ".." and parts[1] not in (".", "..")
        if not (own or shared) or not name.endswith(".safetensors"):
            self.fail(key, "must be a .safetensors file in the model folder, or '../<model>/<file>' "
                           f"in a sibling model folder whose base it shares, got {name!r}")
        return name

    def params(self, key: str) -> dict[str, Any]:
        value = self.raw(key)
        if not isinstance(value, dict):
            self.fail(key, "must be a JSON object of network keyword arguments")
        return value


def _number(fields: _Fields, key: str, value: Any, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fields.fail(key, f"must hold finite numbers, got {value!r}")
    if positive and value <= 0:
        fields.fail(key, f"must hold positive numbers, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Grid:
    """The model's working grid: conditions are resampled onto it (see DEVELOPERS.md)."""

    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    orientation: str = "RAS"


@dataclass(frozen=True)
class NetworkSpec:
    """A network of the model: its safetensors file and its constructor keyword arguments."""

    weights: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Covariates:
    """The base model's own conditioning (BrainLDM: sex, age, ventricular and brain volume)."""

    names: tuple[str, ...]
    default: tuple[float, ...]


@dataclass(frozen=True)
class Label:
    """One row of the label table: a label value in a segmentation and its name."""

    value: int
    name: str


@dataclass(frozen=True)
class Modality:
    """A modality condition channel and how it is normalized (interpreted by conditions.py)."""

    name: str
    normalization: dict[str, Any]


@dataclass(frozen=True)
class NoiseSchedule:
    """The base model's training noise schedule (MONAI scheduler arguments)."""

    num_train_timesteps: int
    schedule: str
    beta_start: float
    beta_end: float
    clip_sample: bool


@dataclass(frozen=True)
class ModelConfig:
    """A parsed and checked `config.json`.

    Args:
        name: model name (registry name for shipped models).
        task: one of `TASKS`.
        description: one line shown in model lists.
        grid: working grid of the image (conditions and output).
        intensity_range: (low, high) of the base model's output intensities.
        autoencoder: MONAI `AutoencoderKL` weights file and kwargs.
        diffusion: MONAI `DiffusionModelUNet` weights file and kwargs.
        covariates: the base model's covariates, or None for an unconditioned base model.
        adapter: `networks.VCM` weights file and kwargs, or None for a base-only model.
        latent_channels: channels of the autoencoder's latent.
        scale_factor: latents are multiplied by it before diffusion and divided before decoding.
        noise_schedule: the base model's training noise schedule.
        sampling_scheduler: default sampler, "ddim" or "ddpm".
        sampling_steps: default number of sampling steps.
        labels: label table (one one-hot condition channel per row, in order).
        modalities: modality channels, after the label channels.
        metadata: free-form JSON (training details); not interpreted.
    """

    name: str
    task: str
    description: str
    grid: Grid
    intensity_range: tuple[float, float]
    autoencoder: NetworkSpec
    diffusion: NetworkSpec
    covariates: Covariates | None
    adapter: NetworkSpec | None
    latent_channels: int
    scale_factor: float
    noise_schedule: NoiseSchedule
    sampling_scheduler: str
    sampling_steps: int
    labels: tuple[Label, ...] = ()
    modalities: tuple[Modality, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def condition_channel_names(self) -> list[str]:
        """Names of the condition channels, in channel order: labels, then modalities."""
        return [label.name for label in self.labels] + [modality.name for modality in self.modalities]

    @property
    def latent_downsampling(self) -> int:
        """How many image voxels one latent voxel spans along each axis."""
        return 2 ** (len(self.autoencoder.params["channels"]) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, *spatial) of a latent of the model grid."""
        factor = self.latent_downsampling
        return (self.latent_channels, *(size // factor for size in self.grid.size))

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_NAME) -> ModelConfig:
        """Parses and checks a config.json object; `source` names the file in error messages."""
        top = _Fields(data, source)
        unknown = sorted(set(top.data) - set(_TOP_LEVEL_FIELDS))
        if unknown:
            top.fail(unknown[0], f"is not a known field (known: {', '.join(_TOP_LEVEL_FIELDS)})")
        version = top.integer("format_version", minimum=1)
        if version != FORMAT_VERSION:
            top.fail("format_version", f"is {version}; this version of VCMSynthesis reads {FORMAT_VERSION}")

        grid = top.obj("grid")
        sizes = grid.raw("size")
        if not (isinstance(sizes, list) and len(sizes) == 3
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
            grid.fail("size", f"must be 3 positive integers, got {sizes!r}")
        orientation = grid.string("orientation")
        axes = orientation.upper().replace("L", "R").replace("P", "A").replace("I", "S")
        if sorted(axes) != ["A", "R", "S"]:
            grid.fail("orientation", f"must be 3 letters such as RAS or LPS, got {orientation!r}")

        intensity = top.obj("intensity")
        low, high = intensity.numbers("range", count=2)
        if not low < high:
            intensity.fail("range", f"must be [low, high] with low < high, got {[low, high]}")

        autoencoder = top.obj("autoencoder")
        diffusion = top.obj("diffusion")
        adapter = top.obj("adapter", optional=True)
        latent = top.obj("latent")
        scheduler = top.obj("scheduler")
        sampling = top.obj("sampling")
        conditions = top.obj("conditions")
        metadata = top.raw("metadata", optional=True) or {}
        if not isinstance(metadata, dict):
            top.fail("metadata", "must be a JSON object")

        config = cls(
            name=top.string("name"),
            task=top.string("task", choices=TASKS),
            description=top.string("description", allow_empty=True),
            grid=Grid(spacing=grid.numbers("spacing", count=3, positive=True), size=tuple(sizes),
                      orientation=orientation.upper()),
            intensity_range=(low, high),
            autoencoder=NetworkSpec(autoencoder.weights_file("weights"), autoencoder.params("params")),
            diffusion=NetworkSpec(diffusion.weights_file("weights"), diffusion.params("params")),
            covariates=_parse_covariates(diffusion.obj("covariates", optional=True)),
            adapter=None if adapter is None else NetworkSpec(adapter.weights_file("weights"),
                                                             adapter.params("params")),
            latent_channels=latent.integer("channels", minimum=1),
            scale_factor=latent.number("scale_factor", positive=True),
            noise_schedule=NoiseSchedule(
                num_train_timesteps=scheduler.integer("num_train_timesteps", minimum=1),
                schedule=scheduler.string("schedule", choices=NOISE_SCHEDULES),
                beta_start=scheduler.number("beta_start", positive=True),
                beta_end=scheduler.number("beta_end", positive=True),
                clip_sample=scheduler.boolean("clip_sample"),
            ),
            sampling_scheduler=sampling.string("scheduler", choices=SAMPLING_SCHEDULERS),
            sampling_steps=sampling.integer("steps", minimum=1),
            labels=_parse_labels(conditions.obj("labels", optional=True)),
            modalities=_parse_modalities(conditions),
            metadata=metadata,
        )
        _check_consistency(config, top)
        return config

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads and checks a config.json file."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise UserError(f"{path} is {path.stat().st_size / 2**20:.0f} MiB, too large to be a model "
                                f"config; fix or replace the file")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path} is missing; a model folder needs a {CONFIG_NAME}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read {path}: {error}") from None
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}); "
                            f"fix or replace the file") from None
        except RecursionError:
            raise UserError(f"{path} is nested too deeply to be a model config; "
                            "fix or replace the file") from None
        except ValueError as error:  # NaN / Infinity, which JSON does not have
            raise UserError(f"{path} {error}; fix or replace the file") from None
        try:
            return cls.from_dict(data, str(path))
        except RecursionError:  # parsed, but too deep for the field checks
            raise UserError(f"{path} is nested too deeply to be a model config; "
                            "fix or replace the file") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json object; `from_dict(to_dict())` gives back an equal config."""

        def network(spec: NetworkSpec) -> dict[str, Any]:
            return {"weights": spec.weights, "params": spec.params}

        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "task": self.task,
            "description": self.description,
            "grid": {"spacing": list(self.grid.spacing), "size": list(self.grid.size),
                     "orientation": self.grid.orientation},
            "intensity": {"range": list(self.intensity_range)},
            "autoencoder": network(self.autoencoder),
            "diffusion": {
                **network(self.diffusion),
                "covariates": None if self.covariates is None else {
                    "names": list(self.covariates.names), "default": list(self.covariates.default)},
            },
            "adapter": None if self.adapter is None else network(self.adapter),
            "latent": {"channels": self.latent_channels, "scale_factor": self.scale_factor},
            "scheduler": {
                "num_train_timesteps": self.noise_schedule.num_train_timesteps,
                "schedule": self.noise_schedule.schedule,
                "beta_start": self.noise_schedule.beta_start,
                "beta_end": self.noise_schedule.beta_end,
                "clip_sample": self.noise_schedule.clip_sample,
            },
            "sampling": {"scheduler": self.sampling_scheduler, "steps": self.sampling_steps},
            "conditions": {
                "labels": {"table": [{"value": label.value, "name": label.name} for label in self.labels]}
                if self.labels else None,
                "modalities": [{"name": modality.name, "normalization": modality.normalization}
                               for modality in self.modalities],
            },
            "metadata": self.metadata,
        }


def _parse_covariates(covariates: _Fields | None) -> Covariates | None:
    if covariates is None:
        return None
    names = covariates.raw("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        covariates.fail("names", f"must be a non-empty list of names, got {names!r}")
    default = covariates.numbers("default", count=len(names))
    return Covariates(tuple(names), default)


def _parse_labels(labels: _Fields | None) -> tuple[Label, ...]:
    if labels is None:
        return ()
    table = labels.raw("table")
    if not isinstance(table, list):
        labels.fail("table", "must be a list of {\"value\": int, \"name\": str}")
    rows = []
    for index, row in enumerate(table):
        entry = _Fields(row, labels.source, labels.path(f"table[{index}]"))
        value = entry.integer("value", minimum=0)
        if value > LABEL_MAX:
            entry.fail("value", f"must be at most {LABEL_MAX} (labelmaps are 32-bit), got {value}")
        rows.append(Label(value, entry.string("name")))
    for key in ("value", "name"):
        seen = [getattr(row, key) for row in rows]
        if len(set(seen)) != len(seen):
            labels.fail("table", f"repeats a label {key}: {seen}")
    return tuple(rows)


def _parse_modalities(conditions: _Fields) -> tuple[Modality, ...]:
    modalities = conditions.raw("modalities", optional=True) or []
    if not isinstance(modalities, list):
        conditions.fail("modalities", "must be a list of {\"name\": str, \"normalization\": {...}}")
    parsed = []
    for index, item in enumerate(modalities):
        entry = _Fields(item, conditions.source, conditions.path(f"modalities[{index}]"))
        normalization = entry.obj("normalization")
        normalization.string("kind")
        parsed.append(Modality(entry.string("name"), normalization.data))
    names = [modality.name for modality in parsed]
    if len(set(names)) != len(names):
        conditions.fail("modalities", f"repeats a modality name: {names}")
    return tuple(parsed)


def _check_network_integers(value: Any, key: str, top: _Fields) -> None:
    """Channel and block counts beyond `MAX_NETWORK_INTEGER` would build networks of terabytes."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_network_integers(item, f"{key}.{name}", top)
    elif isinstance(value, list):
        for item in value:
            _check_network_integers(item, key, top)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_NETWORK_INTEGER:
        top.fail(key, f"holds {value}, more than {MAX_NETWORK_INTEGER}: a network that size would not fit "
                      "in memory")
    elif isinstance(value, float) and not math.isfinite(value):
        top.fail(key, f"holds {value}, which is not a finite number")


def _check_consistency(config: ModelConfig, top: _Fields) -> None:
    """Cross-field checks that would otherwise surface as shape errors inside the networks."""
    autoencoder, diffusion = config.autoencoder.params, config.diffusion.params
    latent = config.latent_channels
    ae_channels = autoencoder.get("channels")
    if not isinstance(ae_channels, list) or not ae_channels:
        top.fail("autoencoder.params.channels", "must be the list of AutoencoderKL channels per level")
    if autoencoder.get("latent_channels", config.latent_channels) != config.latent_channels:
        top.fail("autoencoder.params.latent_channels", f"must equal latent.channels ({latent})")
    schedule = config.noise_schedule
    if schedule.num_train_timesteps > MAX_TRAIN_TIMESTEPS:
        top.fail("scheduler.num_train_timesteps", f"must be at most {MAX_TRAIN_TIMESTEPS}, "
                                                  f"got {schedule.num_train_timesteps}")
    if not schedule.beta_start <= schedule.beta_end < 1:
        # betas are noise variances per step: outside (0, 1) the sampler produces NaN
        top.fail("scheduler.beta_end", f"must be below 1 and at least beta_start ({schedule.beta_start}), "
                                       f"got {schedule.beta_end}")
    for kind in ("autoencoder", "diffusion", "adapter"):
        spec = getattr(config, kind)
        if spec is not None:
            _check_network_integers(spec.params, f"{kind}.params", top)
    dm_channels = diffusion.get("channels")
    if not isinstance(dm_channels, list) or not dm_channels:
        top.fail("diffusion.params.channels", "must be the list of DiffusionModelUNet channels per level")
    covariate_count = 0 if config.covariates is None else len(config.covariates.names)
    expected_in = latent + covariate_count
    if diffusion.get("in_channels") != expected_in:
        top.fail("diffusion.params.in_channels",
                 f"must be latent channels + covariates = {expected_in}, got {diffusion.get('in_channels')}")
    if diffusion.get("out_channels") != config.latent_channels:
        top.fail("diffusion.params.out_channels", f"must equal latent.channels ({latent})")
    if bool(diffusion.get("with_conditioning", False)) != (config.covariates is not None):
        top.fail("diffusion.covariates",
                 "must be set exactly when diffusion.params.with_conditioning is true")
    if config.covariates is not None and diffusion.get("cross_attention_dim") != covariate_count:
        top.fail("diffusion.params.cross_attention_dim",
                 f"must equal the number of covariates ({covariate_count})")
    factor = config.latent_downsampling * 2 ** (len(dm_channels) - 1)
    if any(size % factor for size in config.grid.size):
        top.fail("grid.size", f"must be divisible by {factor} (autoencoder and diffusion downsampling), "
                              f"got {list(config.grid.size)}")
    if config.adapter is not None:
        condition_count = len(config.condition_channel_names)
        if condition_count == 0:
            top.fail("conditions", "must define labels or modalities for a model with an adapter")
        declared = config.adapter.params.get("condition_channels", condition_count)
        if declared != condition_count:
            top.fail("adapter.params.condition_channels",
                     f"must equal the number of condition channels ({condition_count}), got {declared!r}")
        if config.adapter.params.get("latent_channels", config.latent_channels) != config.latent_channels:
            top.fail("adapter.params.latent_channels", f"must equal latent.channels ({latent})")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"has the value {name}, which is not a number JSON allows")


@dataclass
class LoadedModel:
    """A model folder loaded for inference: frozen networks in eval mode on one device.

    Args:
        config: the parsed config.json.
        folder: the model folder.
        autoencoder: MONAI `AutoencoderKL` (decodes latents into images).
        diffusion: MONAI `DiffusionModelUNet` (the frozen base model, predicts noise).
        adapter: `networks.VCM` predicting (gamma, beta), or None for a base-only model.
        device: where the networks live.
    """

    config: ModelConfig
    folder: Path
    autoencoder: AutoencoderKL
    diffusion: DiffusionModelUNet
    adapter: nn.Module | None
    device: torch.device

    @property
    def condition_channel_names(self) -> list[str]:
        return self.config.condition_channel_names

    @property
    def labels(self) -> tuple[Label, ...]:
        return self.config.labels

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.config.latent_shape


def _build(kind: str, factory: Any, params: dict[str, Any], source: str) -> nn.Module:
    try:
        return factory(**params)
    except (TypeError, ValueError, AssertionError, ArithmeticError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{source}: field '{kind}.params' does not build a {factory.__name__}: {message}; "
                        f"fix the model's {CONFIG_NAME}") from None


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, advice: str) -> None:
    """Loads every tensor of `module` from `state`, first naming any missing, extra or mis-shaped one.

    `load_state_dict(strict=True)` would list every mismatch in a multi-line traceback; a user
    needs one line naming the file and the first tensor that does not fit.

    Args:
        module: the network to fill.
        state: its tensors by name.
        source: the file they came from, as the message should name it.
        advice: what a mismatch means for this file and what to do, ending the message.

    Raises:
        UserError: `state` does not match `module` tensor for tensor, or holds NaN or Inf.
    """
    expected = module.state_dict()
    problem = None
    for name, tensor in expected.items():
        if name not in state:
            problem = f"{source} lacks tensor '{name}'"
        elif state[name].shape != tensor.shape:
            problem = (f"{source}: tensor '{name}' has shape {list(state[name].shape)}, "
                       f"the network expects {list(tensor.shape)}")
        if problem is not None:
            break
    else:
        extra = next((name for name in state if name not in expected), None)
        if extra is not None:
            problem = f"{source} has tensor '{extra}' that the network lacks"
    if problem is not None:
        raise UserError(f"{problem}; {advice}")
    broken = (name for name, tensor in state.items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all())
    name = next(broken, None)
    if name is not None:  # sampling would turn the output into NaN
        raise UserError(f"{source}: tensor '{name}' holds NaN or infinite values (a diverged training run "
                        "or a damaged file); re-download the model or export it from an earlier checkpoint")
    module.load_state_dict(state, strict=True)


def _load_weights(module: nn.Module, path: Path) -> None:
    """Loads a safetensors weights file of the model folder strictly (on the CPU)."""
    if not path.is_file():
        raise UserError(f"weights file {path} is missing; reinstall or re-download the model")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise UserError(f"weights file {path} is not a readable safetensors file ({error}); "
                        f"re-download the model") from None
    load_state_strict(module, tensors, f"weights file {path}",
                      f"the file does not match {CONFIG_NAME}; re-download the model or fix {CONFIG_NAME}")


def _check_size_matches(sketch: nn.Module, path: Path, what: str) -> None:
    """Refuses a config whose network is far larger than its weights file (e.g. channels typed
    1000x too large) before that network is allocated; smaller mismatches are named tensor by
    tensor by `load_state_strict`."""
    expected = sum(tensor.numel() for tensor in sketch.state_dict().values())
    try:
        with safe_open(str(path), framework="pt") as weights:
            stored = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    except (SafetensorError, OSError):
        return  # missing or unreadable: `_load_weights` says so
    if expected > 2 * stored + 2**20:
        raise UserError(f"{what} describes a network of {expected:,} values ({expected * 4 / 2**30:.3g} "
                        f"GiB) but {path} holds {stored:,}; the config does not match its weights: fix "
                        f"{CONFIG_NAME} or re-download the model")


def _frozen(module: nn.Module, device: torch.device) -> nn.Module:
    module.to(device).eval()
    module.requires_grad_(False)
    return module


def load_model_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Loads a model folder: checks config.json, builds the networks, loads their weights strictly.

    Args:
        folder: the model folder (holding config.json).
        device: where to put the networks.

    Raises:
        UserError: the folder, config.json or a weights file is missing or does not match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist; give a model name or a folder "
                        f"with {CONFIG_NAME}")
    config_path = folder / CONFIG_NAME
    config = ModelConfig.load(config_path)
    device = torch.device(device)
    source = str(config_path)
    networks: dict[str, nn.Module | None] = {"adapter": None}
    specs = {"autoencoder": (AutoencoderKL, config.autoencoder),
             "diffusion": (DiffusionModelUNet, config.diffusion)}
    if config.adapter is not None:
        from VCMSynthesisLib.networks import VCM  # only models with an adapter need it

        specs["adapter"] = (VCM, config.adapter)
    for kind, (factory, spec) in specs.items():
        with torch.device("meta"):  # sized without allocating: config and file must agree first
            sketch = _build(kind, factory, spec.params, source)
        _check_size_matches(sketch, folder / spec.weights, f"{source}: '{kind}.params'")
        module = _build(kind, factory, spec.params, source)
        _load_weights(module, folder / spec.weights)
        networks[kind] = _frozen(module, device)
    return LoadedModel(config=config, folder=folder, device=device, **networks)


def _default_model_card(config: ModelConfig) -> str:
    conditions = ", ".join(config.condition_channel_names) or "none (base model only)"
    return (f"# {config.name}\n\n{config.description}\n\n- Task: {config.task}\n"
            f"- Grid: {list(config.grid.size)} voxels at {list(config.grid.spacing)} mm "
            f"({config.grid.orientation})\n"
            f"- Condition channels: {conditions}\n")


def _state_for_saving(module: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    # Cloned: safetensors refuses tensors that share memory, and views must be contiguous.
    state = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous().clone()
    return state


def _verify_saved(staged: Path, folder: Path) -> None:
    """The written folder reads back: its config parses and every weights file is complete."""
    try:
        ModelConfig.load(staged / CONFIG_NAME)
        for path in staged.glob("*.safetensors"):
            load_file(str(path))
    except (UserError, SafetensorError, OSError) as error:
        raise UserError(f"cannot write model folder {folder}: what was written does not read back ({error}); "
                        "is the disk full? (the previous folder, if any, is unchanged)") from None


def _is_shared(spec: NetworkSpec) -> bool:
    """True when the weights live in a sibling model folder (a base shared by several adapters)."""
    return len(Path(spec.weights).parts) > 1


def save_model_folder(
    folder: str | os.PathLike,
    config: ModelConfig,
    autoencoder: nn.Module,
    diffusion: nn.Module,
    adapter: nn.Module | None = None,
    model_card: str = "",
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes a complete model folder atomically.

    Everything is written to a temporary folder beside `folder`; an existing `folder` is replaced
    only once the new one is complete, so a failure leaves the old model untouched. Networks whose
    weights the config places in a sibling folder (`../<base>/<file>`) are not written: that
    file must already exist.

    Args:
        folder: the model folder to create or replace.
        config: the model's configuration (written as config.json).
        autoencoder, diffusion, adapter: the networks whose weights are saved.
        model_card: README.md text; a short card generated from the config when empty.
        dtype: store floating-point weights in this type (e.g. float16 to halve shipped models);
            loading casts them back to the network's type.

    Returns:
        The model folder.
    """
    folder = Path(folder)
    if (adapter is None) != (config.adapter is None):
        raise ValueError("pass an adapter exactly when config.adapter is set")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder; choose another output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder, folder=True, verify=partial(_verify_saved, folder=folder)) as staged:
        text = json.dumps(config.to_dict(), indent=2) + "\n"
        (staged / CONFIG_NAME).write_text(text, encoding="utf-8")
        parts = [(config.autoencoder, autoencoder), (config.diffusion, diffusion)]
        if config.adapter is not None:
            parts.append((config.adapter, adapter))
        for spec, module in parts:
            if _is_shared(spec):
                if not (folder / spec.weights).is_file():
                    raise UserError(f"shared weights {folder / spec.weights} do not exist; "
                                    f"write the base model folder first")
                continue
            save_file(_state_for_saving(module, dtype), str(staged / spec.weights),
                      metadata={"format": "pt"})
        (staged / MODEL_CARD_NAME).write_text(model_card or _default_model_card(config), encoding="utf-8")
    return folder


def share_base(folders: list[str | os.PathLike], base_folder: str | os.PathLike,
               dtype: torch.dtype | None = torch.float16) -> Path:
    """Stores the frozen base that several adapter models were trained on once, in its own folder.

    Every adapter model folder carries the whole base; shipping it once per model multiplies its
    size. `base_folder` (a sibling of `folders`) becomes a base-only model (adapter null, sampled
    unguided) and each model's config points to its weights (`../<base>/...`). Floating-point
    weights are stored in `dtype`; loading casts them back to float32.

    Args:
        folders: model folders (siblings) whose autoencoder and diffusion weights are identical.
        base_folder: the base-only model folder to write.
        dtype: storage type of floating-point weights; None keeps them as they are.

    Returns:
        The base folder.

    Raises:
        UserError: a folder is not a sibling of `base_folder`, or the models' bases differ.
    """
    base_folder = Path(base_folder)
    models = [load_model_folder(folder) for folder in folders]
    first = models[0]
    for model in models:
        if model.folder.resolve().parent != base_folder.resolve().parent:
            raise UserError(f"{model.folder} is not a sibling of {base_folder}; shared weights are "
                            f"referenced as '../{base_folder.name}/...'")
        for kind in ("autoencoder", "diffusion"):
            ours, theirs = getattr(first, kind).state_dict(), getattr(model, kind).state_dict()
            if (getattr(first.config, kind).params != getattr(model.config, kind).params
                    or any(not torch.equal(ours[name], theirs[name]) for name in ours)):
                raise UserError(f"{model.folder} and {first.folder} have different {kind} weights; "
                                f"only models trained on one frozen base can share it")
    base_training = {part: summary for part, summary in first.config.metadata.get("training", {}).items()
                     if part != "adapter"}
    base_config = replace(
        first.config, name=base_folder.name, task="synthesis", adapter=None, labels=(), modalities=(),
        metadata={**first.config.metadata, "training": base_training},
        description=f"the frozen base model shared by {', '.join(m.config.name for m in models)} "
                    f"(unguided sampling)",
        autoencoder=replace(first.config.autoencoder, weights="autoencoder.safetensors"),
        diffusion=replace(first.config.diffusion, weights="diffusion.safetensors"))
    save_model_folder(base_folder, base_config, first.autoencoder, first.diffusion, dtype=dtype)
    for model in models:
        card_path = model.folder / MODEL_CARD_NAME
        card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
        shared = {kind: replace(getattr(model.config, kind),
                                weights=f"../{base_folder.name}/{kind}.safetensors")
                  for kind in ("autoencoder", "diffusion")}
        save_model_folder(model.folder, replace(model.config, **shared), model.autoencoder,
                          model.diffusion, model.adapter, model_card=card, dtype=dtype)
    return base_folder
