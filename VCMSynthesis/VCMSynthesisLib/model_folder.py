"""The project's model format: a folder with `config.json`, safetensors weights and a model card.

`config.json` is described in DEVELOPERS.md and parsed by `model_config.ModelConfig`. Weights are
safetensors (no pickle), loaded strictly (`load_state_strict`, also used for third-party
checkpoints): a missing, extra or mis-shaped tensor is an error naming the file and the tensor.
Folders are written beside the target and renamed into place, so a crash never leaves half a
model where a complete one was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from VCMSynthesisLib.checksums import Checksums
from VCMSynthesisLib.decoding import DecodePlan, decode, encode
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.files import atomic_path
from VCMSynthesisLib.model_config import CONFIG_NAME, MODEL_CARD_NAME, Label, ModelConfig, NetworkSpec


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
        decode_plan: how `decode` and `encode` split the autoencoder's work (`memory.plan_decode`
            sets it to fit the memory available).
    """

    config: ModelConfig
    folder: Path
    autoencoder: AutoencoderKL
    diffusion: DiffusionModelUNet
    adapter: nn.Module | None
    device: torch.device
    decode_plan: DecodePlan = field(default_factory=DecodePlan)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The image `(1, 1, *grid.size)` of a latent times `scale_factor` (as the sampler holds
        it), unclipped, decoded as `decode_plan` says."""
        return decode(self.autoencoder, latent / self.config.scale_factor, self.decode_plan)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The latent mean of an image `(1, 1, *grid.size)` times `scale_factor` (as the sampler
        holds latents), encoded as `decode_plan` says."""
        return encode(self.autoencoder, image, self.decode_plan) * self.config.scale_factor

    @cached_property
    def weights_sha256(self) -> str:
        """sha256 of the adapter's weights file, else the base diffusion model's: which model
        made a result (`worker.provenance`); read once per loaded model."""
        spec = self.config.adapter or self.config.diffusion
        return Checksums.of_file(self.folder / spec.weights).sha256

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
    needs one line naming the file and the first tensor that does not fit. A module built on the
    meta device takes `state`'s tensors themselves (in its own dtype): nothing is allocated twice,
    and tensors of a safetensors file stay the file's mapped pages.

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
    on_meta = any(tensor.is_meta for tensor in expected.values())
    if on_meta:  # float16 files (`save_model_folder(dtype=...)`) become the network's dtype
        state = {name: tensor.to(expected[name].dtype) for name, tensor in state.items()}
    module.load_state_dict(state, strict=True, assign=on_meta)


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


def frozen(module: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """`module` on `device`, in eval mode, without gradients; on the CPU in the channels-last
    layout if `channels_last`: the decoder and the condition encoder run 1.15-1.25x faster in it
    (`bench/bench_sampler.py --variants before,whole`), the base model no faster."""
    module.to(device).eval()
    module.requires_grad_(False)
    if device.type == "cpu" and channels_last:
        module.to(memory_format=torch.channels_last_3d)
    return module


def load_model_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Loads a model folder: checks config.json, builds the networks, loads their weights strictly.

    On the CPU the base diffusion model's parameters are its weights file's pages, mapped and not
    copied (it is frozen in its stored layout). Only its denoising steps, on the latent grid, read
    them: while the networks that run at the full grid (the decoder, the encoders) run, the OS can
    reclaim those 2.2 GB of a paper-size model (BrainLDM's) where memory is short, and read them
    back for the next step. Their alignment in the file moves float rounding (1e-6).

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
        mapped = kind == "diffusion"  # the small networks are copied: aligned and channels-last
        module = sketch if mapped else _build(kind, factory, spec.params, source)
        _load_weights(module, folder / spec.weights)
        networks[kind] = frozen(module, device, channels_last=not mapped)
    return LoadedModel(config=config, folder=folder, device=device, **networks)


def mapped_weight_bytes(config: ModelConfig, folder: str | os.PathLike, device: str | torch.device) -> int:
    """Bytes of weights that `load_model_folder` leaves as their file's mapped pages, which the OS
    can reclaim: the base model's on the CPU, when its file holds float32 (a float16 file is
    converted, so copied)."""
    path = Path(folder) / config.diffusion.weights
    if torch.device(device).type != "cpu":
        return 0
    try:
        with safe_open(str(path), framework="pt") as weights:
            dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError):
        return 0
    return path.stat().st_size if dtypes == {"F32"} else 0


def _default_model_card(config: ModelConfig) -> str:
    return (f"# {config.name}\n\n{config.description}\n\n- Task: {config.task}\n"
            f"- Grid: {list(config.grid.size)} voxels at {list(config.grid.spacing)} mm "
            f"({config.grid.orientation})\n"
            f"- Conditions: {config.conditions_summary}\n")


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
