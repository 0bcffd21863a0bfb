"""A model's `config.json`: parsed into a `ModelConfig` whose every field is checked.

A hand-edited or truncated file fails with one line naming the file and the field instead of a
traceback deep inside MONAI. Standard library only: Slicer's own Python lists models and reads
their label tables without torch (`model_folder.py` loads the networks).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from VCMSynthesisLib.errors import UserError

FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kB
# Sizes past these are typing mistakes (or hostile files); they must fail before anything is
# allocated. A network integer (channels, blocks) above MAX_NETWORK_INTEGER is refused outright.
MAX_TRAIN_TIMESTEPS = 100_000
MAX_NETWORK_INTEGER = 1 << 16
LABEL_MAX = 2**31 - 1  # labelmaps are read as int32
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
TASKS = ("synthesis", "translation", "superres")
# The samplers a model's `sampling.scheduler` may name (`sampler.build_scheduler`), and how they are shown.
SAMPLING_SCHEDULERS = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp-2m": "DPM-Solver++(2M)"}
# Condition strengths above this overshoot any condition (gamma and beta are trained at 1).
MAX_STRENGTH = 4.0
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


def _optional_number(fields: _Fields, key: str, default: float | None, bounds: tuple[float, float]
                     ) -> float | None:
    """An optional number within `bounds` (inclusive); `default` where it is absent or null."""
    value = fields.raw(key, optional=True)
    if value is None:
        return default
    value = _number(fields, key, value, positive=False)
    if not bounds[0] <= value <= bounds[1]:
        fields.fail(key, f"must be between {bounds[0]:g} and {bounds[1]:g}, got {value:g}")
    return value


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


def label_of_segment(labels: tuple[Label, ...], name: str, label_value: int | None,
                     by_value: bool = False) -> int | None:
    """The model label value a segment stands for, or None where that is the user's decision.

    The label named like the segment (any case); else the segment's own label value, where it
    is a label other than 0 and the name is Slicer's own for an imported labelmap ("Label_2"
    with value 2), or for any name with `by_value`. A segment called "lesion" is no model label
    just because its value is one. The one matching rule of the panel, the batch script and the
    worker (`scene.default_label_mapping`, `conditions.label_values_to_table`).
    """
    wanted = name.strip().casefold()
    for label in labels:
        if label.name.strip().casefold() == wanted:
            return label.value
    if label_value and label_value in {label.value for label in labels} and (
            by_value or name == f"Label_{label_value}"):
        return label_value
    return None


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
        intensity_background: the value the model's images take outside the anatomy (skull-stripped
            training images), or None; synthesized images are set to it outside the segmentation.
        autoencoder: MONAI `AutoencoderKL` weights file and kwargs.
        diffusion: MONAI `DiffusionModelUNet` weights file and kwargs.
        covariates: the base model's covariates, or None for an unconditioned base model.
        adapter: `networks.VCM` weights file and kwargs, or None for a base-only model.
        latent_channels: channels of the autoencoder's latent.
        scale_factor: latents are multiplied by it before diffusion and divided before decoding.
        noise_schedule: the base model's training noise schedule.
        sampling_scheduler: default sampler, a key of `SAMPLING_SCHEDULERS`.
        sampling_steps: default number of sampling steps.
        sampling_strength: default condition strength (`networks.modulate`; 1 as trained).
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
    sampling_strength: float = 1.0
    intensity_background: float | None = None
    labels: tuple[Label, ...] = ()
    modalities: tuple[Modality, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def condition_channel_names(self) -> list[str]:
        """Names of the condition channels, in channel order: labels, then modalities."""
        return [label.name for label in self.labels] + [modality.name for modality in self.modalities]

    @property
    def conditions_summary(self) -> str:
        """What the model takes, in words, for model lists and model cards."""
        parts = []
        if self.labels:
            parts.append("segmentation: " + ", ".join(label.name for label in self.labels))
        if self.modalities:
            parts.append("volume: " + ", ".join(modality.name for modality in self.modalities))
        if self.covariates is not None:
            parts.append("covariates: " + ", ".join(self.covariates.names))
        return "; ".join(parts) or "none (unguided)"

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
            sampling_strength=_optional_number(sampling, "strength", 1.0, (0.0, MAX_STRENGTH)),
            intensity_background=_optional_number(intensity, "background", None, (low, high)),
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
            "intensity": {"range": list(self.intensity_range), "background": self.intensity_background},
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
            "sampling": {"scheduler": self.sampling_scheduler, "steps": self.sampling_steps,
                         "strength": self.sampling_strength},
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
