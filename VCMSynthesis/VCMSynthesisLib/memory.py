"""Memory planning: choose how a job decodes so that it fits, and refuse one that cannot fit.

The peak of a synthesis run is the autoencoder's decoder at the full model grid. Decoded whole,
its last levels hold a few feature maps of `max(channels[0], channels[1])` channels at every
voxel (the upsampling output, a residual block's input, normalisation and convolution outputs),
next to the weights and the condition channels. `ACTIVATION_MAPS` (how many such maps are alive
at once) was calibrated on the CPU with `bench/bench_memory.py`: the measurements imply 4.4
(80x96x80 grid) to 5.3 (64^3) maps, and 8 on a 48^3 grid where fixed costs dominate (covered by
`MARGIN_BYTES`). Decoded in slabs (`decoding.py`), about `SLAB_STORED_MAPS` such maps are stored
(half as much in float16, `DecodePlan.stored_dtype`) and a few slabs' worth are in flight
(`SLAB_TRANSIENT_MAPS`). While the decoder runs, the base model's weights are mapped file pages
the OS can reclaim (`model_folder.mapped_weight_bytes`), so the estimate is the larger of
sampling (every weight and the condition encoder, measured at 5.0 of its widest maps at the
paper's size) and decoding (the rest). At the paper's size `bench/bench_sampler.py --variants
slabs,half` measured peaks of 6.4 and 5.0 GB resident, of which 4.6 and 2.8 GB anonymous (not
reclaimable); the estimate is 4.8 GB for both, set by sampling.
On CUDA the activations are counted in half precision (the sampler runs under fp16 autocast);
those figures are not calibrated on a GPU yet.
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
SLAB_ROWS = (8, 4)  # tried in turn, thickest first: 8 rows decode as fast as 16 or 32 (bench_sampler)
# Tried in turn on the CPU: exact float32 slabs, then the big maps stored in float16 (half their
# memory; the image moves by float16's rounding). On CUDA, autocast computes in float16 already.
CPU_STORAGE = (None, torch.float16)


def estimate_peak_bytes(config: ModelConfig, folder: str | os.PathLike, device: str | torch.device,
                        plan: DecodePlan = WHOLE) -> int:
    """Estimated peak memory of one synthesis run at the model grid on `device`, decoding as
    `plan` says: the larger of sampling (every weight, the condition encoder's maps) and decoding
    (the decoder's maps, without the base model's weights where they are mapped file pages that
    the OS can reclaim, `model_folder.mapped_weight_bytes`).

    Args:
        config: the model's config (grid, networks, conditions).
        folder: the model folder; its weight files' sizes count as the parameters.
        device: "cpu" or "cuda" (half-precision activations under CUDA autocast).
    """
    folder = Path(folder)
    specs = [config.autoencoder, config.diffusion] + ([config.adapter] if config.adapter else [])
    files = [folder / spec.weights for spec in specs]
    weights = sum(path.stat().st_size for path in files if path.is_file())
    voxels = int(np.prod(config.grid.size))
    channels = config.autoencoder.params["channels"]
    widest = max(channels[:2])
    activation_bytes = 2 if torch.device(device).type == "cuda" else 4
    full_map = widest * voxels * activation_bytes
    if plan.slab_bytes is None or full_map <= plan.slab_bytes:
        decoder = ACTIVATION_MAPS * full_map
    else:
        in_flight = min(1.0, (plan.slab_rows + 2) / config.grid.size[0])
        stored = 1.0 if plan.stored_dtype is None else plan.stored_dtype.itemsize / activation_bytes
        decoder = (SLAB_STORED_MAPS * stored + SLAB_TRANSIENT_MAPS * in_flight) * full_map
    encoder = 0
    if config.adapter is not None:  # VCM's condition encoder runs at the full grid too
        widest_condition = config.adapter.params.get("encoder_channels", [0])[0]
        encoder = ACTIVATION_MAPS * widest_condition * voxels * activation_bytes
    sampling = weights + encoder
    decoding = weights - mapped_weight_bytes(config, folder, device) + decoder
    conditions = (len(config.condition_channel_names) + 1) * voxels * 4
    return int(max(sampling, decoding) + conditions + MARGIN_BYTES)


def plan_decode(config: ModelConfig, folder: str | os.PathLike, device: str | torch.device,
                available: int | None = None) -> DecodePlan:
    """The decode plan whose estimated peak fits in `available` bytes; a UserError with a way out
    when not even the thinnest slabs fit.

    On the CPU, slabs (thickest first, float32 before float16 storage): they decode as fast as
    the whole volume at once (`bench/bench_sampler.py --variants whole,slabs,half`) in less
    memory. On CUDA, the whole volume when it fits (slabs there are not measured yet), else slabs.

    Args:
        available: bytes the run may use; None measures them on `device`.
    """
    available = available_bytes(device) if available is None else available
    if torch.device(device).type == "cuda":
        plans = [WHOLE, *(DecodePlan(slab_rows=rows) for rows in SLAB_ROWS)]
    else:
        plans = [DecodePlan(slab_rows=rows, stored_dtype=dtype)
                 for dtype in CPU_STORAGE for rows in SLAB_ROWS]
    needed = {plan: estimate_peak_bytes(config, folder, device, plan) for plan in plans}
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
