"""Memory planning: choose how a job decodes (and encodes) so that it fits, and refuse one that
cannot fit.

The peak of a synthesis run is the autoencoder's decoder at the full model grid. Decoded whole,
its last levels hold a few feature maps of `max(channels[0], channels[1])` channels at every
voxel (the upsampling output, a residual block's input, normalisation and convolution outputs),
next to the weights and the condition channels. `ACTIVATION_MAPS` (how many such maps are alive
at once) was calibrated on the CPU with `bench/bench_memory.py`: the measurements imply 4.4
(80x96x80 grid) to 5.3 (64^3) maps, and 8 on a 48^3 grid where fixed costs dominate (covered by
`MARGIN_BYTES`). Decoded in slabs (`decoding.py`), about `SLAB_STORED_MAPS` such maps are stored
(half as much in float16, `DecodePlan.stored_dtype`) and a few slabs' worth are in flight
(`SLAB_TRANSIENT_MAPS`). The base model's weights are mapped file pages
(`model_folder.mapped_weight_bytes`) that only its denoising steps, which run on the small latent
grid, read: while the networks that run at the full grid run (the decoder; VCM's condition
encoder, measured at 5.0 of its widest maps at the paper's size; `edit`'s encoder), the OS can
reclaim them. So the estimate is the larger of the steps (every weight) and the largest
full-grid network beside the other weights. At the paper's size `bench/bench_sampler.py
--variants slabs,half` measured peaks of 6.2-6.4 and 4.9 GB resident, of which 4.0-4.2 and
2.7 GB anonymous (not reclaimable); the estimates are 4.9 and 3.1 GB, and each ran inside a
memory cgroup of 5 and 4 GiB from a cold page cache (`bench/under_memory_limit.sh`).
`edit` also encodes the scan at the model grid first. The encoder's first level holds maps of
`channels[0]` channels at every voxel; `bench/bench_encoding.py` measured a whole-volume encode
at 2.8 (paper size) to 4.0 (128^3) such maps (`ENCODER_MAPS`). In slabs a residual block still
stores two (its input, kept for the sum, and its first convolution's output, whose statistics
the second normalisation needs): measured 2.0-2.4 with 2- to 16-row slabs
(`ENCODER_SLAB_STORED_MAPS`, plus the in-flight slabs as for the decoder). At the paper's size the
encoder in slabs then stays under the decoder (3.8 against 4.2 GB), where whole it would not (5.9).
On CUDA the activations are counted in half precision (the sampler runs under fp16 autocast),
the encoder's in single precision (`edit` encodes outside autocast); those figures are not
calibrated on a GPU yet.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from VCMSynthesisLib.decoding import WHOLE, DecodePlan
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import ModelConfig
from VCMSynthesisLib.model_folder import mapped_weight_bytes

ACTIVATION_MAPS = 6.0
SLAB_STORED_MAPS = 1.25
SLAB_TRANSIENT_MAPS = 3.0
MARGIN_BYTES = 256 * 2**20
ENCODER_MAPS = 4.0
ENCODER_SLAB_STORED_MAPS = 2.4
SLAB_ROWS = (8, 4)  # tried in turn, thickest first: 8 rows decode as fast as 16 or 32 (bench_sampler)
# Tried in turn on the CPU: exact float32 slabs, then the big maps stored in float16 (half their
# memory; the image moves by float16's rounding). On CUDA, autocast computes in float16 already.
CPU_STORAGE = (None, torch.float16)


def estimate_peak_bytes(config: ModelConfig, folder: str | os.PathLike, device: str | torch.device,
                        plan: DecodePlan = WHOLE, encodes: bool = False) -> int:
    """Estimated peak memory of one synthesis run at the model grid on `device`, decoding (and
    encoding) as `plan` says: the larger of the denoising steps (every weight) and the largest
    network that runs at the full grid (its maps, beside every weight but the base model's where
    they are mapped file pages the OS can reclaim, `model_folder.mapped_weight_bytes`).

    Args:
        config: the model's config (grid, networks, conditions).
        folder: the model folder; its weight files' sizes count as the parameters.
        device: "cpu" or "cuda" (half-precision activations under CUDA autocast).
        encodes: the run also encodes an image at the model grid (`edit` encodes the scan).
    """
    folder = Path(folder)
    specs = [config.autoencoder, config.diffusion] + ([config.adapter] if config.adapter else [])
    files = [folder / spec.weights for spec in specs]
    weights = sum(path.stat().st_size for path in files if path.is_file())
    voxels = int(np.prod(config.grid.size))
    channels = config.autoencoder.params["channels"]
    widest = max(channels[:2])
    activation_bytes = 2 if torch.device(device).type == "cuda" else 4
    in_flight = min(1.0, (plan.slab_rows + 2) / config.grid.size[0])
    decoder = _activation_bytes(widest * voxels * activation_bytes, plan, ACTIVATION_MAPS,
                                SLAB_STORED_MAPS * _stored_fraction(plan, activation_bytes)
                                + SLAB_TRANSIENT_MAPS * in_flight)
    full_grid = [decoder]
    if encodes:  # the encoder's first level: maps of channels[0] at every voxel, float32 (no autocast)
        full_grid.append(_activation_bytes(channels[0] * voxels * 4, plan, ENCODER_MAPS,
                                           ENCODER_SLAB_STORED_MAPS * _stored_fraction(plan, 4)
                                           + SLAB_TRANSIENT_MAPS * in_flight))
    if config.adapter is not None:  # VCM's condition encoder runs at the full grid too (whole)
        encoder = config.adapter.params.get("encoder_channels", [0])[0] * voxels * activation_bytes
        full_grid.append(ACTIVATION_MAPS * encoder)
    resident = max(weights, weights - mapped_weight_bytes(config, folder, device) + max(full_grid))
    conditions = (len(config.condition_channel_names) + 1) * voxels * 4
    return int(resident + conditions + MARGIN_BYTES)


def _stored_fraction(plan: DecodePlan, computed_bytes: int) -> float:
    """The share of a stored map's bytes that `plan.stored_dtype` keeps."""
    return 1.0 if plan.stored_dtype is None else plan.stored_dtype.itemsize / computed_bytes


def _activation_bytes(full_map: int, plan: DecodePlan, whole_maps: float, slab_maps: float) -> float:
    """A network's activations at its peak: `whole_maps` full-grid maps of `full_map` bytes, or
    `slab_maps` of them where `plan` runs maps that large in slabs."""
    slabbed = plan.slab_bytes is not None and full_map > plan.slab_bytes
    return (slab_maps if slabbed else whole_maps) * full_map


def plan_decode(config: ModelConfig, folder: str | os.PathLike, device: str | torch.device,
                available: int | None = None, encodes: bool = False) -> DecodePlan:
    """The decode (and encode) plan whose estimated peak fits in `available` bytes; a UserError
    with a way out when not even the thinnest slabs fit.

    On the CPU, slabs (thickest first, float32 before float16 storage): they decode as fast as
    the whole volume at once (`bench/bench_sampler.py --variants whole,slabs,half`) in less
    memory. On CUDA, the whole volume when it fits (slabs there are not measured yet), else slabs.

    Args:
        available: bytes the run may use; None measures them on `device`.
        encodes: the run also encodes an image at the model grid (`edit`).
    """
    available = available_bytes(device) if available is None else available
    if torch.device(device).type == "cuda":
        plans = [WHOLE, *(DecodePlan(slab_rows=rows) for rows in SLAB_ROWS)]
    else:
        plans = [DecodePlan(slab_rows=rows, stored_dtype=dtype)
                 for dtype in CPU_STORAGE for rows in SLAB_ROWS]
    needed = {plan: estimate_peak_bytes(config, folder, device, plan, encodes) for plan in plans}
    for plan in plans:
        if needed[plan] <= available:
            return plan
    device = torch.device(device)
    size = "x".join(str(s) for s in config.grid.size)
    advice = ("run on the CPU (--device cpu) or free GPU memory" if device.type == "cuda"
              else "close other programs, use a machine with more RAM or a GPU")
    least = min(needed.values())
    raise UserError(
        f"model '{config.name}' needs about {least / 2**30:.1f} GiB on {device.type} at its {size} grid, "
        f"but only {available / 2**30:.1f} GiB is available; {advice}, or use a model with a smaller grid "
        "(a smaller region)"
    )


def available_bytes(device: str | torch.device) -> int:
    """Memory this process can still get: free GPU memory, or the CPU's available RAM.

    On the CPU, the smaller of /proc/meminfo's MemAvailable and the cgroup (container) limit.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_available()
    limit = _cgroup_headroom()
    candidates = [value for value in (available, limit) if value is not None]
    return min(candidates) if candidates else 2**63


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return int(limit) - current
    except (OSError, ValueError):
        return None
