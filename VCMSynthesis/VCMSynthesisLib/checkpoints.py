"""Loading third-party PyTorch checkpoints safely: the paper's VCM and BrainLDM, and their import.

The paper's released files are pickled state dicts: the VCM saved from a DDP-wrapped model
(`module.` prefix) with the layer names of the reference `models/vcm.py`, BrainLDM's
autoencoder and diffusion model in the naming of the older MONAI GenerativeModels package.
This module is the one place that unpickles (`torch.load(weights_only=True)`), renames those
layouts onto `networks.VCM` and MONAI core classes, loads them strictly, and converts them into
the project's model folder (`vcm-synthesis import-reference`). It is also the one place for
BrainLDM's settings, which the sampler and the registry import.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from VCMSynthesisLib.checksums import Checksums
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig
from VCMSynthesisLib.model_folder import load_state_strict, save_model_folder
from VCMSynthesisLib.networks import PAPER_VCM_PARAMS, VCM

# BrainLDM (MONAI model zoo bundle `brain_image_synthesis_latent_diffusion_model`; Pinaya et al.
# 2022), in MONAI core's argument names. Same networks as the reference `get_AE_CFG`/`get_DM_CFG`.
BRAINLDM_AUTOENCODER_PARAMS: dict = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 3,
    "channels": [64, 128, 128, 128],
    "num_res_blocks": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [False, False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
}
BRAINLDM_DIFFUSION_PARAMS: dict = {
    "spatial_dims": 3,
    "in_channels": 7,
    "out_channels": 3,
    "channels": [256, 512, 768],
    "num_res_blocks": 2,
    "attention_levels": [False, True, True],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "resblock_updown": True,
    "num_head_channels": [0, 512, 768],
    "with_conditioning": True,
    "transformer_num_layers": 1,
    "cross_attention_dim": 4,
    "upcast_attention": True,
    "use_flash_attention": True,
}
BRAINLDM_NOISE_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.0015,
    "beta_end": 0.0205,
    "clip_sample": False,
}
BRAINLDM_SCALE_FACTOR = 0.8962649106979370
# Covariates, each scaled to [0, 1] as BrainLDM was trained. The default is the reference demo
# subject (`data/I-demo/sex-age-ventV-brainV.pt` of github.com/Ahn-Ssu/VCM).
BRAINLDM_COVARIATE_NAMES = ("sex", "age", "ventricular_volume", "brain_volume")
BRAINLDM_COVARIATE_DEFAULT = (1.0, 0.8421052694320679, 0.4340895712375641, 0.9092848300933838)
# 1 mm isotropic, 160x224x160, the first array axis pointing left (the reference's LAS arrays).
BRAINLDM_GRID: dict = {"spacing": [1.0, 1.0, 1.0], "size": [160, 224, 160], "orientation": "LAS"}
BRAINLDM_INTENSITY_RANGE = (0.0, 1.0)

# The released VCM's condition: a label map with values 0..8 one-hot encoded, the background
# channel dropped (reference `VCM_sampling.ipynb`). The release names no label: these names are
# inferred from its example condition (volumes, positions, neighbours; README "The paper's 8
# labels", `training/describe_label_map.py`), not published.
REFERENCE_LABEL_NAMES = ("white matter", "cortical grey matter", "ventricles", "deep grey matter",
                         "hippocampus", "amygdala", "CSF", "brainstem")
REFERENCE_LABEL_VALUES = tuple(range(1, len(REFERENCE_LABEL_NAMES) + 1))
REFERENCE_SAMPLING_STEPS = 200  # DDIM steps of the reference notebook

# Reference `models/vcm.py` names -> `networks.VCM` names, applied in order (time U-Net excluded).
_REFERENCE_RENAMES = (
    (r"^modality_encoder\.", "condition_encoder."),
    (r"\.down_blocks\.(\d+)\.resnets\.", r".levels.\1.res_blocks."),
    (r"\.down_blocks\.(\d+)\.downsampler\.", r".levels.\1.downsample."),
    (r"\.skip_connection\.", ".skip."),
    (r"^mlp_shared\.", "shared."),
    (r"^mlp_gamma\.", "gamma_head."),
    (r"^mlp_beta\.", "beta_head."),
)
_DDP_PREFIX = "module."
_NOT_THE_NETWORK = "it is not the expected network; check the file, or the network sizes (--params)"
_TIME_UNET_PREFIX = "time_unet."


def load_torch_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a pickled state dict without running code from it (`weights_only=True`, on the CPU).

    Raises:
        UserError: the file is missing, is not a PyTorch checkpoint, needs arbitrary unpickling,
            or holds something other than a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise UserError(f"checkpoint {path} holds pickled objects beyond tensors and VCMSynthesis "
                            f"refuses to unpickle code; re-save it as a plain state dict or "
                            f"safetensors") from None
        raise UserError(f"{path} is not a PyTorch checkpoint (unpickling failed: {error})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line}); "
                        f"download it again") from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise UserError(f"checkpoint {path} is not a state dict (a dict of named tensors); "
                        f"save the model's state_dict() instead")
    return state


def _to_current_layout(
    network: DiffusionModelUNet | AutoencoderKL,
    state: dict[str, torch.Tensor],
    source: Path,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Renames a GenerativeModels-layout state dict for `network` with MONAI's `load_old_state_dict`.

    MONAI's converter loads as it goes, fills tensors the file lacks from the fresh network and
    drops tensors it does not place; it is run here against a capturing `load_state_dict` so that
    the result can be checked strictly instead. A state dict already in the current layout comes
    back unchanged; tensors the converter did not place come back under their own names.
    `prefix` is the network's name inside the checkpoint, for error messages.
    """
    own = network.state_dict()
    if all(name in state for name in own):
        return state
    remaining = dict(state)
    converted: dict[str, torch.Tensor] = {}
    network.load_state_dict = lambda new_state, strict=True: converted.update(new_state)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            network.load_old_state_dict(remaining)
    except KeyError as error:
        raise UserError(f"checkpoint {source} lacks tensor '{prefix}{error.args[0]}'; "
                        f"{_NOT_THE_NETWORK}") from None
    finally:
        del network.load_state_dict
    placed = {
        name: tensor for name, tensor in converted.items()
        if name not in own or tensor.data_ptr() != own[name].data_ptr()
    }
    leftovers = {
        name: tensor for name, tensor in remaining.items()
        if name not in converted and not _is_unused_projection(name, own)
    }
    return {**placed, **leftovers}


def _is_unused_projection(name: str, own: dict[str, torch.Tensor]) -> bool:
    """True for a GenerativeModels attention `proj_attn` tensor that its network never applied.

    GenerativeModels' spatial attention block created `proj_attn` but did not use it (MONAI issue
    #7991); a MONAI core network built with `include_fc=False` reproduces that and has no
    place for it, so the tensor is dropped rather than reported as unexpected.
    """
    block, separator, _ = name.rpartition(".proj_attn.")
    is_attention_block = f"{block}.attn.to_q.weight" in own
    return bool(separator) and is_attention_block and f"{block}.attn.out_proj.weight" not in own


def load_reference_vcm(path: str | Path, params: dict[str, Any] | None = None) -> VCM:
    """Loads the paper's released VCM checkpoint (reference layout, DDP prefix) strictly, in eval mode.

    Args:
        path: the `.pt` file, e.g. `vcm_wegith_complexSemantics.pt`.
        params: `networks.VCM` kwargs of the checkpoint; the paper's (`PAPER_VCM_PARAMS`) if None.

    Raises:
        UserError: the file cannot be read safely or does not match the network tensor for tensor.
    """
    path = Path(path)
    vcm = VCM(**(PAPER_VCM_PARAMS if params is None else params))
    state = {name.removeprefix(_DDP_PREFIX): tensor for name, tensor in load_torch_checkpoint(path).items()}
    unet_state = {
        name.removeprefix(_TIME_UNET_PREFIX): tensor
        for name, tensor in state.items() if name.startswith(_TIME_UNET_PREFIX)
    }
    renamed = {}
    for name, tensor in state.items():
        if not name.startswith(_TIME_UNET_PREFIX):
            for pattern, replacement in _REFERENCE_RENAMES:
                name = re.sub(pattern, replacement, name)
            renamed[name] = tensor
    for name, tensor in _to_current_layout(vcm.time_unet, unet_state, path, _TIME_UNET_PREFIX).items():
        renamed[_TIME_UNET_PREFIX + name] = tensor
    load_state_strict(vcm, renamed, f"checkpoint {path}", _NOT_THE_NETWORK)
    return vcm.eval()


def load_brainldm(
    autoencoder_path: str | Path,
    diffusion_path: str | Path,
    autoencoder_params: dict[str, Any] | None = None,
    diffusion_params: dict[str, Any] | None = None,
) -> tuple[AutoencoderKL, DiffusionModelUNet]:
    """Loads BrainLDM's autoencoder and diffusion model, old (GenerativeModels) or current layout.

    Args:
        autoencoder_path: the autoencoder's `.pth` state dict.
        diffusion_path: the diffusion model's `.pth` state dict.
        autoencoder_params: `AutoencoderKL` kwargs; BrainLDM's if None.
        diffusion_params: `DiffusionModelUNet` kwargs; BrainLDM's if None.

    Returns:
        (autoencoder, diffusion_unet), MONAI core networks in eval mode.
    """
    networks = []
    for factory, params, path in (
        (AutoencoderKL, autoencoder_params or BRAINLDM_AUTOENCODER_PARAMS, Path(autoencoder_path)),
        (DiffusionModelUNet, diffusion_params or BRAINLDM_DIFFUSION_PARAMS, Path(diffusion_path)),
    ):
        network = factory(**params)
        state = _to_current_layout(network, load_torch_checkpoint(path), path)
        load_state_strict(network, state, f"checkpoint {path}", _NOT_THE_NETWORK)
        networks.append(network.eval())
    return networks[0], networks[1]


def _model_card(name: str, sources: dict[str, dict[str, str]]) -> str:
    files = "\n".join(
        f"- {kind}: `{info['file']}` (sha256 `{info['sha256']}`)" for kind, info in sources.items()
    )
    labels = ", ".join(f"{value} {label}"
                       for value, label in zip(REFERENCE_LABEL_VALUES, REFERENCE_LABEL_NAMES))
    return f"""# {name}

The Volumetric Conditioning Module (VCM) released with Ahn et al., "Volumetric Conditioning Module
to Control Pretrained Diffusion Models for 3D Medical Images", WACV 2025 (arXiv 2410.21826,
github.com/Ahn-Ssu/VCM), steering BrainLDM (Pinaya et al. 2022; MONAI model zoo bundle
`brain_image_synthesis_latent_diffusion_model`), converted by `vcm-synthesis import-reference`.

- Output: T1-weighted brain MRI, 160x224x160 voxels at 1 mm, intensities in [0, 1].
- Condition: a label map with values 1..8 (one channel each; 0 is background):
  {labels}.
  The release does not name its "complex semantics" labels: these names were INFERRED from the
  released example condition (`data/I-demo/new_semantics.nii.gz`: volumes, positions, left/right
  pairs, neighbours), not published by the authors. FreeSurfer / SynthSeg segmentations map onto
  them with `--label-map aseg` (VCMSynthesis README, "The paper's 8 labels").
- BrainLDM covariates (sex, age, ventricular volume, brain volume, each scaled to [0, 1]); the
  default {list(BRAINLDM_COVARIATE_DEFAULT)} is the reference demo subject.
- Sampling: DDIM, {REFERENCE_SAMPLING_STEPS} steps as in the reference notebook.

Converted from:
{files}

Weights keep the terms of their original releases (BrainLDM: MONAI model zoo; VCM: the authors'
repository); check them before redistributing.
"""


def reference_model_config(
    name: str,
    adapter_params: dict[str, Any] | None = None,
    autoencoder_params: dict[str, Any] | None = None,
    diffusion_params: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelConfig:
    """The config of BrainLDM steered by a VCM of the paper's release (its 8 labels, BrainLDM's
    grid, covariates and noise schedule, the reference's DDIM steps).

    Args:
        name: the model's name.
        adapter_params: `networks.VCM` kwargs; the paper's if None.
        autoencoder_params: `AutoencoderKL` kwargs; BrainLDM's if None.
        diffusion_params: `DiffusionModelUNet` kwargs; BrainLDM's if None.
        metadata: free-form JSON for config.json's `metadata`.
    """
    adapter_params = adapter_params or PAPER_VCM_PARAMS
    return ModelConfig.from_dict({
        "format_version": 1,
        "name": name,
        "task": "synthesis",
        "description": "BrainLDM T1 brain MRI steered by the paper's 8-label VCM (Ahn et al., WACV 2025; "
                       "label names inferred from its example, not published)",
        "grid": BRAINLDM_GRID,
        "intensity": {"range": list(BRAINLDM_INTENSITY_RANGE)},
        "autoencoder": {"weights": "autoencoder.safetensors",
                        "params": autoencoder_params or BRAINLDM_AUTOENCODER_PARAMS},
        "diffusion": {
            "weights": "diffusion.safetensors",
            "params": diffusion_params or BRAINLDM_DIFFUSION_PARAMS,
            "covariates": {"names": list(BRAINLDM_COVARIATE_NAMES),
                           "default": list(BRAINLDM_COVARIATE_DEFAULT)},
        },
        "adapter": {"weights": "adapter.safetensors", "params": adapter_params},
        "latent": {"channels": adapter_params["latent_channels"], "scale_factor": BRAINLDM_SCALE_FACTOR},
        "scheduler": BRAINLDM_NOISE_SCHEDULE,
        "sampling": {"scheduler": "ddim", "steps": REFERENCE_SAMPLING_STEPS},
        "conditions": {
            "labels": {"table": [{"value": value, "name": label}
                                 for value, label in zip(REFERENCE_LABEL_VALUES, REFERENCE_LABEL_NAMES)]},
            "modalities": [],
        },
        "metadata": metadata or {},
    }, source=f"reference model {name!r}")


def import_reference(
    vcm_path: str | Path,
    autoencoder_path: str | Path,
    diffusion_path: str | Path,
    output_folder: str | Path,
    name: str = "brainldm-vcm-semantics",
    params: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Converts the paper's released `.pt` files into a model folder (config.json + safetensors).

    Args:
        vcm_path: the released VCM checkpoint.
        autoencoder_path: BrainLDM's autoencoder checkpoint.
        diffusion_path: BrainLDM's diffusion model checkpoint.
        output_folder: the model folder to write; an existing model folder there is replaced.
        name: the model's name.
        params: optional replacements of the networks' kwargs, keyed "adapter", "autoencoder",
            "diffusion" (for checkpoints of other sizes); the released sizes if None.

    Returns:
        The written model folder.
    """
    params = params or {}
    output_folder = Path(output_folder)
    if output_folder.exists() and not (output_folder / CONFIG_NAME).is_file():
        raise UserError(f"{output_folder} exists and is not a model folder; choose a new output folder")
    adapter_params = params.get("adapter", PAPER_VCM_PARAMS)
    autoencoder_params = params.get("autoencoder", BRAINLDM_AUTOENCODER_PARAMS)
    diffusion_params = params.get("diffusion", BRAINLDM_DIFFUSION_PARAMS)
    vcm = load_reference_vcm(vcm_path, adapter_params)
    autoencoder, diffusion = load_brainldm(autoencoder_path, diffusion_path, autoencoder_params,
                                           diffusion_params)
    sources = {
        kind: {"file": Path(path).name, "sha256": Checksums.of_file(Path(path)).sha256}
        for kind, path in (("adapter", vcm_path), ("autoencoder", autoencoder_path),
                           ("diffusion", diffusion_path))
    }
    config = reference_model_config(name, vcm.params, autoencoder_params, diffusion_params,
                                    metadata={"imported_from": sources})
    return save_model_folder(output_folder, config, autoencoder, diffusion, vcm, _model_card(name, sources))


def _read_params_file(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read --params file {path} ({error}); give a JSON file") from None
    kinds = ("adapter", "autoencoder", "diffusion")
    if not isinstance(params, dict) or not all(
        key in kinds and isinstance(value, dict) for key, value in params.items()
    ):
        raise UserError(f"--params file {path} must be a JSON object whose keys are among "
                        f"adapter, autoencoder, diffusion, each a JSON object of network kwargs")
    return params


def _run_import_reference(args: argparse.Namespace) -> int:
    print("importing the reference checkpoints (loading and checking every tensor) ...", file=sys.stderr)
    params = _read_params_file(args.params)
    try:
        folder = import_reference(args.vcm, args.autoencoder, args.diffusion, args.output, args.name, params)
    except (TypeError, ValueError) as error:
        if not params:
            raise
        raise UserError(f"the --params sizes do not build a network ({error}); fix {args.params}") from None
    print(folder)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `vcm-synthesis import-reference`."""
    parser = subparsers.add_parser(
        "import-reference",
        help="convert the paper's released VCM and BrainLDM .pt files into a model folder",
        description="Convert the VCM checkpoint released with Ahn et al. (WACV 2025) and BrainLDM's "
                    "autoencoder and diffusion model into a model folder (config.json + safetensors).",
    )
    parser.add_argument("--vcm", required=True, type=Path, help="vcm_wegith_complexSemantics.pt")
    parser.add_argument("--autoencoder", required=True, type=Path, help="BrainLDM autoencoder.pth")
    parser.add_argument("--diffusion", required=True, type=Path, help="BrainLDM diffusion_model.pth")
    parser.add_argument("--output", required=True, type=Path, help="model folder to write")
    parser.add_argument("--name", default="brainldm-vcm-semantics", help="model name (default: %(default)s)")
    parser.add_argument("--params", type=Path, default=None,
                        help="JSON file replacing network kwargs for checkpoints of other sizes: "
                             '{"adapter": {...}, "autoencoder": {...}, "diffusion": {...}}')
    parser.set_defaults(handler=_run_import_reference)
