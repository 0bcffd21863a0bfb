"""Decoding and encoding in bounded memory: the autoencoder's big blocks run in slabs.

At the paper's size (160x224x160) the decoder's last level holds feature maps of 64-128 channels
at 5.7 M voxels, 1.5-2.9 GB each, and a whole-volume decode peaks near 10 GB on the CPU; the
encoder's first level (`edit` encodes the scan) holds 64-channel maps of 1.5 GB. Those blocks are
all slab-friendly: convolutions (stride 1, or the encoder's stride-2 downsampling after its
asymmetric zero pad), nearest upsampling, GroupNorm and residual sums. So once a block's input or
output passes `DecodePlan.slab_bytes`, it runs in slabs along the first spatial axis: a
convolution reads the input rows its slab of output rows reads (plus `kernel // 2` rows either
side for a stride-1 convolution, the halo) and computes exactly that slab's rows of the
whole-volume convolution; GroupNorm takes its statistics over all slabs before it normalises any;
inputs are released slab by slab as soon as no later slab reads them. The result equals the
whole-volume decode or encode up to float rounding (at the paper's size mostly the whole-volume
GroupNorm's own float32 statistics, `test_decoding.py`). Where memory is shorter still, the
slabbed maps can be stored in float16 between blocks (`DecodePlan.stored_dtype`): the largest one
then takes half the memory, while every block still computes in float32; the result moves by
float16's rounding of those maps.

This is MAISI's tensor splitting (`monai.apps.generation.maisi`) applied to the MONAI
`AutoencoderKL` that BrainLDM and this project's models use: MAISI's own autoencoder cannot load
those weights as they are (it upsamples trilinearly where `AutoencoderKL` upsamples nearest).
Blocks of other kinds (attention, transposed convolutions) run whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import AEKLDownsample, AEKLResBlock, AsymmetricPad
from torch import nn

SLAB_AXIS = 2  # the first spatial axis: a slab is one contiguous block in NCDHW and NDHWC layouts
Rows = Callable[[int, int], torch.Tensor]  # rows [start, stop) of a tensor along the slab axis
Pad = tuple[int, ...]  # a zero pad in `F.pad`'s order (last axis first, (low, high) each)
Store = Callable[[torch.Tensor], torch.Tensor]  # a computed slab as it is kept until read


@dataclass(frozen=True)
class DecodePlan:
    """How `decode` and `encode` split the work.

    Attributes:
        slab_bytes: a block whose input or output would be larger than this runs in slabs
            (None: all blocks run whole, as `AutoencoderKL.decode` and `encode` do).
        slab_rows: rows per slab along the slab axis: fewer rows lower the peak; each convolution
            also reads `kernel // 2` rows either side, which it does not compute again.
        stored_dtype: the dtype slabbed maps over `slab_bytes` are kept in between blocks (None:
            the dtype the blocks compute in). A slab whose values float16 cannot hold is kept as
            computed, so storage never overflows.
    """

    slab_bytes: int | None = 256 * 2**20
    slab_rows: int = 8
    stored_dtype: torch.dtype | None = None


WHOLE = DecodePlan(slab_bytes=None)


class Slabs:
    """A tensor kept as consecutive slabs along `SLAB_AXIS`; slabs can be released early."""

    def __init__(self, slabs: list[torch.Tensor | None]):
        self.slabs = slabs
        sizes = [slab.shape[SLAB_AXIS] for slab in slabs]
        self.bounds = [sum(sizes[:index]) for index in range(len(sizes) + 1)]

    @classmethod
    def split(cls, tensor: torch.Tensor, rows: int) -> Slabs:
        return cls([piece.clone() for piece in torch.split(tensor, rows, dim=SLAB_AXIS)])

    @property
    def length(self) -> int:
        return self.bounds[-1]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        pieces = self.pieces(start, stop)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, SLAB_AXIS)

    def pieces(self, start: int, stop: int) -> list[torch.Tensor]:
        """Views of the slabs' parts that hold rows [start, stop), in order."""
        pieces = []
        for index, slab in enumerate(self.slabs):
            low, high = self.bounds[index], self.bounds[index + 1]
            if high <= start or low >= stop:
                continue
            if slab is None:
                raise RuntimeError(f"slab {index} was released before rows {start}..{stop} were read")
            pieces.append(slab.narrow(SLAB_AXIS, max(start, low) - low, min(stop, high) - max(start, low)))
        return pieces

    def release_before(self, index: int) -> None:
        """Frees the slabs before `index`: no later read reaches them."""
        for earlier in range(index):
            self.slabs[earlier] = None

    def whole(self) -> torch.Tensor:
        return torch.cat(self.slabs, SLAB_AXIS)

    @property
    def shape(self) -> torch.Size:
        """The shape of `whole()` (while the first slab is kept)."""
        shape = list(self.slabs[0].shape)
        shape[SLAB_AXIS] = self.length
        return torch.Size(shape)


def decode(autoencoder: AutoencoderKL, latent: torch.Tensor, plan: DecodePlan = DecodePlan()) -> torch.Tensor:
    """`autoencoder.decode(latent)`, with the blocks whose input or output passes `plan.slab_bytes`
    in slabs.

    For inference only (under `torch.inference_mode` or `no_grad`): slabs are summed in place.

    Args:
        autoencoder: a MONAI `AutoencoderKL` in eval mode.
        latent: `(1, latent_channels, *latent grid)`, unscaled (as `AutoencoderKL.decode` takes it).
    """
    return _run_blocks(autoencoder.decoder, autoencoder.post_quant_conv(latent), plan)


def encode(autoencoder: AutoencoderKL, image: torch.Tensor, plan: DecodePlan = DecodePlan()) -> torch.Tensor:
    """`autoencoder.encode(image)[0]` (the latent mean; its sigma is not computed), with the
    encoder's blocks whose input or output passes `plan.slab_bytes` in slabs.

    For inference only (under `torch.inference_mode` or `no_grad`): slabs are summed in place.

    Args:
        autoencoder: a MONAI `AutoencoderKL` in eval mode.
        image: `(1, in_channels, *image grid)`.
    """
    return autoencoder.quant_conv_mu(_run_blocks(autoencoder.encoder, image, plan))


def _run_blocks(network: nn.Module, x: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    """`x` through the encoder's or decoder's blocks in turn, each whole or, where
    `_runs_in_slabs`, in slabs."""
    blocks = list(network.blocks)
    layout = _memory_format(network)
    computed = next(network.parameters()).dtype
    element_size = _computed_element_size(x.device, computed)  # stored slabs may be narrower
    slabbed: Slabs | None = None
    pending_norm: nn.GroupNorm | None = None
    for index, block in enumerate(blocks):
        if slabbed is None:
            x = x.contiguous(memory_format=layout)  # convolutions with few channels drop the layout
            if not _runs_in_slabs(block, x.shape, x.element_size(), plan):
                x = block(x)
                continue
            slabbed = Slabs.split(x, _input_rows(block, plan.slab_rows))
            del x
        elif not _runs_in_slabs(block, slabbed.shape, element_size, plan):
            x, slabbed = block(_computable(slabbed.whole(), computed)), None
            continue
        if isinstance(block, nn.GroupNorm) and index + 1 < len(blocks) and _is_plain_conv(blocks[index + 1]):
            pending_norm = block  # normalised on the fly as the next convolution reads its rows
            continue
        narrow = plan.stored_dtype is not None and index + 1 < len(blocks)  # the last output: as computed
        big = _output_bytes(block, slabbed.shape, element_size) > plan.slab_bytes  # sets the peak
        store = _narrowed(plan.stored_dtype) if narrow and big else _as_computed
        slabbed = _run_slabbed(block, slabbed, plan, store, pending_norm)
        pending_norm = None
    return x if slabbed is None else slabbed.whole()


def _memory_format(network: nn.Module) -> torch.memory_format:
    """The layout of the encoder's or decoder's weights (`model_folder.frozen` makes them
    channels-last on the CPU): activations kept in it let every convolution run in it."""
    weight = next(conv.weight for conv in network.modules()  # 1x1x1 or 1 input channel: either layout
                  if isinstance(conv, nn.Conv3d) and max(conv.kernel_size) > 1 and conv.in_channels > 1)
    return _layout(weight)


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def _runs_in_slabs(block: nn.Module, shape: Sequence[int], element_size: int, plan: DecodePlan) -> bool:
    """Whether `block` runs in slabs on an input of `shape`: it can, and its input or its output
    passes `plan.slab_bytes`."""
    if plan.slab_bytes is None or not _slabbable(block):
        return False
    return max(math.prod(shape) * element_size, _output_bytes(block, shape, element_size)) > plan.slab_bytes


def _slabbable(block: nn.Module) -> bool:
    if isinstance(block, AEKLResBlock):
        shortcut = [] if isinstance(block.nin_shortcut, nn.Identity) else [block.nin_shortcut]
        return all(_is_plain_conv(conv) for conv in [block.conv1, block.conv2, *shortcut])
    if isinstance(block, UpSample):
        return _nearest_upsample(block) is not None
    if isinstance(block, AEKLDownsample):
        return _downsample(block) is not None
    return isinstance(block, nn.GroupNorm) or _is_plain_conv(block)


def _is_plain_conv(block: nn.Module) -> bool:
    """A MONAI `Convolution` that is only a stride-1 convolution with 'same' padding."""
    if not isinstance(block, Convolution) or list(dict(block.named_children())) != ["conv"]:
        return False
    conv = block.conv
    return (isinstance(conv, nn.Conv3d) and set(conv.stride) == {1} and set(conv.dilation) == {1}
            and conv.padding_mode == "zeros" and all(pad == kernel // 2 and kernel % 2 == 1
                                                      for pad, kernel in zip(conv.padding, conv.kernel_size)))


def _downsample(block: AEKLDownsample) -> tuple[nn.Conv3d, Pad] | None:
    """(convolution, pad) of an `AEKLDownsample` that zero-pads asymmetrically, then runs a
    strided convolution without padding of its own."""
    if not isinstance(block.pad, AsymmetricPad) or not isinstance(block.conv, Convolution):
        return None
    if list(dict(block.conv.named_children())) != ["conv"] or not isinstance(block.conv.conv, nn.Conv3d):
        return None
    conv = block.conv.conv
    if set(conv.padding) != {0} or set(conv.dilation) != {1} or conv.padding_mode != "zeros":
        return None
    return conv, tuple(block.pad.pad)


def _nearest_upsample(block: UpSample) -> tuple[int, Convolution] | None:
    """(scale, post-convolution) of an `UpSample` that is nearest interpolation then a plain conv
    with a cubic kernel (as `_Phases` takes it)."""
    children = dict(block.named_children())
    upsample, postconv = children.get("upsample_non_trainable"), children.get("postconv")
    if set(children) != {"upsample_non_trainable", "postconv"} or not _is_plain_conv(postconv):
        return None
    if len(set(postconv.conv.kernel_size)) != 1:
        return None
    if not isinstance(upsample, nn.Upsample) or upsample.mode != "nearest" or upsample.size is not None:
        return None
    scales = upsample.scale_factor
    scales = scales if isinstance(scales, tuple) else (scales,)
    if len(set(scales)) != 1 or float(scales[0]) != int(scales[0]):
        return None
    return int(scales[0]), postconv


def _input_rows(block: nn.Module, output_rows: int) -> int:
    if isinstance(block, AEKLDownsample):
        return output_rows * _downsample(block)[0].stride[0]
    scale = _nearest_upsample(block)[0] if isinstance(block, UpSample) else 1
    return max(1, output_rows // scale)


def _output_bytes(block: nn.Module, shape: Sequence[int], element_size: int) -> int:
    """Bytes of `block`'s output on an input of `shape` for a `_slabbable` block, without
    running it."""
    channels, sizes = shape[1], list(shape[2:])
    if isinstance(block, AEKLResBlock):
        channels = block.out_channels
    elif isinstance(block, UpSample):
        sizes = [size * _nearest_upsample(block)[0] for size in sizes]
    elif isinstance(block, AEKLDownsample):
        conv, pad = _downsample(block)
        sizes = [_output_length(conv, axis, size, pad) for axis, size in enumerate(sizes)]
    elif isinstance(block, Convolution) and isinstance(block.conv, nn.Conv3d):
        channels = block.conv.out_channels
    return channels * math.prod(sizes) * element_size


def _axis_pad(conv: nn.Conv3d, axis: int, pad: Pad | None) -> tuple[int, int]:
    """(low, high) zero rows before and after the input along spatial `axis`: `pad`'s, or the
    convolution's own padding."""
    if pad is None:
        return conv.padding[axis], conv.padding[axis]
    index = 2 * (len(pad) // 2 - 1 - axis)
    return pad[index], pad[index + 1]


def _output_length(conv: nn.Conv3d, axis: int, length: int, pad: Pad | None) -> int:
    low, high = _axis_pad(conv, axis, pad)
    return (length + low + high - conv.kernel_size[axis]) // conv.stride[axis] + 1


def _input_span(conv: nn.Conv3d, start: int, stop: int, pad: Pad | None) -> tuple[int, int]:
    """The padded input rows [first, last) that output rows [start, stop) of `conv` read, in the
    input's row numbers (negative or past its end: padding)."""
    low, _ = _axis_pad(conv, 0, pad)
    return start * conv.stride[0] - low, (stop - 1) * conv.stride[0] - low + conv.kernel_size[0]


def _computed_element_size(device: torch.device, computed: torch.dtype) -> int:
    """Bytes per value the blocks compute in: autocast's dtype where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type).itemsize
    return computed.itemsize


def _computable(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored values in `dtype`, the weights' (autocast, where it is on, chooses its own)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


def _as_computed(slab: torch.Tensor) -> torch.Tensor:
    return slab


def _narrowed(dtype: torch.dtype) -> Store:
    def store(slab: torch.Tensor) -> torch.Tensor:
        stored = slab.to(dtype)  # beyond float16's range (an inf; or a NaN): kept as computed
        return stored if torch.isfinite(stored.abs().amax()) else slab  # 3x faster than isfinite().all()

    return store


def _run_slabbed(block: nn.Module, x: Slabs, plan: DecodePlan, store: Store,
                 norm: nn.GroupNorm | None = None) -> Slabs:
    if isinstance(block, AEKLResBlock):
        return _res_block(block, x, store)
    if isinstance(block, UpSample):
        scale, postconv = _nearest_upsample(block)
        return _upsample_convolve(postconv.conv, x, scale, plan.slab_rows, store)
    if isinstance(block, AEKLDownsample):
        conv, pad = _downsample(block)
        return _convolve(conv, x.rows, x.length, plan.slab_rows, release=x, store=store, pad=pad)
    if isinstance(block, nn.GroupNorm):  # a norm no convolution follows: normalise slab by slab
        stats = _group_stats(block, x)
        return Slabs([store(_normalize(stats, slab)) for slab in x.slabs])
    rows = x.rows if norm is None else _normalized_rows(norm, _group_stats(norm, x), x, activate=False)
    return _convolve(block.conv, rows, x.length, plan.slab_rows, release=x, store=store)


def _res_block(block: AEKLResBlock, x: Slabs, store: Store) -> Slabs:
    """`x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, with a 1x1x1 convolution on `x` where
    the channels change, slab by slab on `x`'s slabs."""
    shortcut = block.nin_shortcut
    hidden: list[torch.Tensor] = []
    skip: list[torch.Tensor | None] = []
    first = _normalized_rows(block.norm1, _group_stats(block.norm1, x), x, activate=True)
    for index in range(len(x.slabs)):
        start, stop = x.bounds[index], x.bounds[index + 1]
        hidden.append(store(_conv_rows(block.conv1.conv, first, start, stop, x.length)))
        skip.append(x.slabs[index] if isinstance(shortcut, nn.Identity)
                    else store(_conv_rows(shortcut.conv, x.rows, start, stop, x.length)))
        x.release_before(index)  # slab index + 1 reads only slabs index .. index + 2
    x.release_before(len(x.slabs))
    hidden = Slabs(hidden)
    second = _normalized_rows(block.norm2, _group_stats(block.norm2, hidden), hidden, activate=True)
    out = []
    for index in range(len(hidden.slabs)):
        start, stop = hidden.bounds[index], hidden.bounds[index + 1]
        residual = _conv_rows(block.conv2.conv, second, start, stop, hidden.length)
        out.append(store(residual.add_(skip[index])))  # summed as computed, then stored
        skip[index] = None
        hidden.release_before(index)
    return Slabs(out)


def _convolve(conv: nn.Conv3d, rows: Rows, length: int, slab_rows: int, release: Slabs, store: Store,
              pad: Pad | None = None) -> Slabs:
    """`conv` (zero-padded by `pad`, else by its own padding) over a tensor `length` rows long that
    `rows` reads, computed `slab_rows` output rows at a time and kept as `store` says; the slabs of
    `release` (the input) are freed as soon as no later output slab reads them."""
    out = []
    output_length = _output_length(conv, 0, length, pad)
    for start in range(0, output_length, slab_rows):
        stop = min(start + slab_rows, output_length)
        out.append(store(_conv_rows(conv, rows, start, stop, length, pad)))
        _release_rows_before(release, _input_span(conv, stop, stop + 1, pad)[0])
    return Slabs(out)


def _release_rows_before(slabs: Slabs, row: int) -> None:
    """Frees the slabs of `slabs` that hold only rows before `row`."""
    last = max(index for index, bound in enumerate(slabs.bounds) if bound <= max(row, 0))
    slabs.release_before(last)


def _conv_rows(conv: nn.Conv3d, rows: Rows, start: int, stop: int, length: int,
               pad: Pad | None = None) -> torch.Tensor:
    """Output rows [start, stop) of `conv` over the whole tensor (`length` rows), zero-padded by
    `pad` (`AEKLDownsample`'s asymmetric pad) or else by the convolution's own padding: from the
    input rows `_input_span` names, without padding along the slab axis, the convolution computes
    exactly these rows; zero rows stand in beyond the tensor's ends."""
    first, last = _input_span(conv, start, stop, pad)
    low, high = max(first, 0), min(last, length)
    x = _computable(rows(low, high), conv.weight.dtype)
    across = (0,) * 4 if pad is None else pad[:4]  # the other axes: `pad`'s, else conv3d pads them
    if low - first or last - high or any(across):
        x = F.pad(x, (*across, low - first, last - high))
    return F.conv3d(x, conv.weight, conv.bias, stride=conv.stride, padding=(0, *conv.padding[1:]))


@dataclass(frozen=True)
class _Phases:
    """`conv` after nearest upsampling by `scale`, as one convolution of the input itself.

    Output voxel `scale * i + p` (per axis, `p` its phase) reads upsampled rows that all come from
    input rows `i + first[p]` .. `i + first[p] + size - 1`: summing the kernel's taps that land on
    the same input row gives a `size`-tap kernel per phase (2 instead of 3 for a 3x3x3 kernel at
    scale 2: 8 instead of 27 taps a voxel). The `scale**3` phase kernels are stacked along the output
    channels; phase `p` reads the conv's output from row `first[p] - min(first)` on.
    """

    weight: torch.Tensor  # (scale**3 * out_channels, in_channels, size, size, size)
    bias: torch.Tensor | None
    first: tuple[int, ...]  # per phase
    size: int
    scale: int

    @classmethod
    def of(cls, conv: nn.Conv3d, scale: int) -> _Phases:
        kernel, half = conv.kernel_size[0], conv.kernel_size[0] // 2
        first = tuple((phase - half) // scale for phase in range(scale))
        size = max((phase + half) // scale - start + 1 for phase, start in enumerate(first))
        merge = torch.zeros(scale, size, kernel, dtype=conv.weight.dtype, device=conv.weight.device)
        for phase, start in enumerate(first):
            for tap in range(kernel):
                merge[phase, (phase + tap - half) // scale - start, tap] = 1
        weight = torch.einsum("dai,hbj,wck,oxijk->dhwoxabc", merge, merge, merge, conv.weight)
        weight = weight.reshape(-1, *conv.weight.shape[1:2], size, size, size)
        bias = None if conv.bias is None else conv.bias.repeat(scale**3)
        return cls(weight.contiguous(memory_format=_layout(conv.weight)), bias, first, size, scale)

    @property
    def reach(self) -> tuple[int, int]:
        """Input rows the conv reads before row `i` and after it, for phase outputs at row `i`."""
        return -min(self.first), max(self.first) + self.size - 1


def _upsample_convolve(conv: nn.Conv3d, x: Slabs, scale: int, slab_rows: int, store: Store) -> Slabs:
    """`conv` over `x` upsampled (nearest, `scale`), `slab_rows` output rows at a time, without
    upsampling (`_Phases`: 3.4x fewer multiply-adds for a 3x3x3 kernel at scale 2); `x`'s slabs are
    freed as soon as no later output slab reads them."""
    phases = _Phases.of(conv, scale)
    out = []
    length = x.length * scale
    for start in range(0, length, slab_rows):
        stop = min(start + slab_rows, length)
        out.append(store(_upsampled_conv_rows(phases, x, start, stop)))
        _release_rows_before(x, stop // scale - phases.reach[0])
    return Slabs(out)


def _upsampled_conv_rows(phases: _Phases, x: Slabs, start: int, stop: int) -> torch.Tensor:
    """Output rows [start, stop) of the convolution after upsampling, from `x`'s rows."""
    scale, (before, after) = phases.scale, phases.reach
    low, high = start // scale, -(-stop // scale)  # input rows whose phases cover [start, stop)
    first, last = low - before, high + after
    rows = _computable(x.rows(max(first, 0), min(last, x.length)), phases.weight.dtype)
    rows = F.pad(rows, (before, after, before, after, max(first, 0) - first, last - min(last, x.length)))
    stacked = F.conv3d(rows, phases.weight, phases.bias)
    channels = stacked.shape[1] // scale**3
    sizes = [high - low, *(size - before - after for size in rows.shape[SLAB_AXIS + 1:])]
    upsampled = torch.empty((*rows.shape[:1], channels, *(size * scale for size in sizes)),
                            dtype=stacked.dtype, device=stacked.device, memory_format=_layout(stacked))
    for index in range(scale**3):
        phase = (index // scale**2, index // scale % scale, index % scale)
        read = [slice(phases.first[p] + before, phases.first[p] + before + size)
                for p, size in zip(phase, sizes, strict=True)]
        write = [slice(p, None, scale) for p in phase]
        upsampled[:, :, write[0], write[1], write[2]] = stacked[:, index * channels:(index + 1) * channels,
                                                                read[0], read[1], read[2]]
    return upsampled.narrow(SLAB_AXIS, start - low * scale, stop - start)


def _group_stats(norm: nn.GroupNorm, x: Slabs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift that apply `norm` (statistics over the whole tensor) as
    `x * scale + shift`: each slab's per-channel mean and centred sum of squares, combined in
    double precision (Chan et al.'s parallel variance, exact where E[x^2] - E[x]^2 would cancel)."""
    moments = [_channel_moments(slab.float()) for slab in x.slabs]
    count = sum(slab_count for slab_count, _, _ in moments)
    mean = sum(slab_count * slab_mean for slab_count, slab_mean, _ in moments) / count
    squares = sum(slab_squares + slab_count * (slab_mean - mean).square()
                  for slab_count, slab_mean, slab_squares in moments)
    per_group = norm.num_channels // norm.num_groups
    group_mean = mean.view(norm.num_groups, per_group).mean(1, keepdim=True)
    group_squares = (squares.view(norm.num_groups, per_group)
                     + count * (mean.view(norm.num_groups, per_group) - group_mean).square()).sum(1)
    inverse_std = (group_squares / (count * per_group) + norm.eps).rsqrt()
    scale = inverse_std.repeat_interleave(per_group)
    shift = -group_mean.view(-1).repeat_interleave(per_group) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    return scale.float(), shift.float()


def _channel_moments(slab: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(voxels, per-channel mean, per-channel sum of squared deviations) of `slab`: float32 sums
    as matrix-vector products on a view of it (several times faster on the CPU than a reduction
    over the spatial axes), returned in double precision for `_group_stats` to combine."""
    channels = slab.shape[1]
    if slab.is_contiguous(memory_format=torch.channels_last_3d):
        matrix = slab.movedim(1, -1).reshape(-1, channels)  # (voxels, channels)
    else:
        matrix = slab.movedim(1, 0).reshape(channels, -1).T
    ones = slab.new_ones(1, matrix.shape[0])
    mean = (ones @ matrix)[0] / matrix.shape[0]
    centred = (matrix - mean).square_()
    return matrix.shape[0], mean.double(), (ones @ centred)[0].double()


def _normalize(stats: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """`x` normalised with `_group_stats`' scale and shift, in float32 (as GroupNorm gives under
    autocast) whatever `x`'s dtype, into `out` if given."""
    scale, shift = (value.view(1, -1, *(1,) * (x.dim() - 2)) for value in stats)
    return torch.addcmul(shift, x, scale, out=out)


def _normalized_rows(norm: nn.GroupNorm, stats, x: Slabs, activate: bool) -> Rows:
    def rows(start: int, stop: int) -> torch.Tensor:
        pieces = x.pieces(start, stop)
        if len(pieces) == 1:
            normalized = _normalize(stats, pieces[0])
        else:  # each piece normalised into its place: no concatenated copy first
            shape = (*pieces[0].shape[:SLAB_AXIS], stop - start, *pieces[0].shape[SLAB_AXIS + 1:])
            normalized = torch.empty(shape, device=pieces[0].device, memory_format=_layout(pieces[0]))
            row = 0
            for piece in pieces:
                _normalize(stats, piece, out=normalized.narrow(SLAB_AXIS, row, piece.shape[SLAB_AXIS]))
                row += piece.shape[SLAB_AXIS]
        return F.silu(normalized, inplace=True) if activate else normalized

    return rows
