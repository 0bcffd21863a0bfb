"""Bounded-memory decoding and encoding (`decoding.py`) against MONAI's whole-volume
`AutoencoderKL.decode` and `encode`, and the memory plan (`memory.plan_decode`) that chooses them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL
from tiny_models import make_tiny_model_folder
from VCMSynthesisLib.decoding import WHOLE, DecodePlan, decode, encode
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.memory import estimate_peak_bytes, plan_decode
from VCMSynthesisLib.model_folder import frozen, load_model_folder
from VCMSynthesisLib.sampler import sample

EVERY_BLOCK = 1  # slab_bytes that sends every slabbable block through the slab path


def _autoencoder(seed: int = 0, **options) -> AutoencoderKL:
    torch.manual_seed(seed)
    params = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3, channels=(8, 16, 16),
                  num_res_blocks=2, norm_num_groups=4, attention_levels=(False, False, False))
    return AutoencoderKL(**{**params, **options}).eval()


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_slabs_decode_what_the_whole_volume_decodes(rows, channels_last):
    autoencoder = _autoencoder()
    if channels_last:
        autoencoder = frozen(autoencoder, torch.device("cpu"))
    latent = torch.randn(1, 3, 5, 7, 6, generator=torch.Generator().manual_seed(1))  # odd sizes
    with torch.inference_mode():
        expected = autoencoder.decode(latent)
        got = decode(autoencoder, latent, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=rows))
    assert got.shape == expected.shape == (1, 1, 20, 28, 24)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
def test_float16_storage_decodes_the_whole_volume_image_within_its_rounding(channels_last):
    """Maps stored in float16 (11 significant bits) move the image by about their rounding; the
    blocks still compute in float32, and the image itself is returned in float32."""
    autoencoder = _autoencoder()
    if channels_last:
        autoencoder = frozen(autoencoder, torch.device("cpu"))
    latent = torch.randn(1, 3, 5, 7, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = autoencoder.decode(latent)
        exact = decode(autoencoder, latent, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=3))
        got = decode(autoencoder, latent, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=3,
                                                     stored_dtype=torch.float16))
    assert got.dtype == torch.float32
    difference = (got - expected).abs().max() / expected.abs().max()
    assert 1e-5 < difference < 1e-2  # rounded (not exact), by about float16's 2^-11
    assert (exact - expected).abs().max() < 1e-4 * expected.abs().max()


def test_slabs_beyond_float16s_range_are_stored_as_computed():
    """A map with values float16 cannot hold (above 65504) must not turn into infinities."""
    autoencoder = _autoencoder()
    with torch.no_grad():
        autoencoder.decoder.blocks[0].conv.weight.mul_(2e5)  # the first map: up to ~1e5
    latent = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = autoencoder.decode(latent)
        got = decode(autoencoder, latent, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=3,
                                                     stored_dtype=torch.float16))
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()


@pytest.mark.parametrize("scale, kernel", [(2, 3), (2, 5), (3, 3), (3, 1)])
@pytest.mark.parametrize("rows", [1, 4, 5])
def test_upsampling_by_phases_equals_upsampling_then_convolving(scale, kernel, rows):
    """The per-phase kernels (`_Phases`) against nearest upsampling followed by the convolution,
    on odd sizes, for scales and kernels beyond the autoencoder's (2, 3x3x3)."""
    from VCMSynthesisLib.decoding import Slabs, _as_computed, _upsample_convolve

    generator = torch.Generator().manual_seed(9)
    conv = torch.nn.Conv3d(3, 4, kernel, padding=kernel // 2)
    x = torch.randn(1, 3, 5, 4, 3, generator=generator)
    with torch.inference_mode():
        expected = conv(torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest"))
        got = _upsample_convolve(conv, Slabs.split(x, 2), scale, rows, _as_computed).whole()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


def test_blocks_that_cannot_run_in_slabs_run_whole():
    """Attention (here in the decoder's middle and at a level) needs the whole tensor; the
    blocks around it still run in slabs and the result is the same."""
    autoencoder = _autoencoder(attention_levels=(False, False, True), with_decoder_nonlocal_attn=True)
    latent = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = autoencoder.decode(latent)
        got = decode(autoencoder, latent, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=3))
        whole = decode(autoencoder, latent, WHOLE)
    assert torch.equal(whole, expected)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def test_a_transposed_convolution_decoder_runs_whole():
    autoencoder = _autoencoder(use_convtranspose=True)
    latent = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = autoencoder.decode(latent)
        got = decode(autoencoder, latent, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=3))
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(17, 23, 19), (20, 28, 24)])
def test_slabs_encode_what_the_whole_volume_encodes(rows, channels_last, size):
    """Odd sizes: the downsampling's asymmetric pad adds a zero row at the far end, and its
    stride-2 rows read rows of two slabs."""
    autoencoder = _autoencoder()
    if channels_last:
        autoencoder = frozen(autoencoder, torch.device("cpu"))
    image = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        expected = autoencoder.encode(image)[0]
        got = encode(autoencoder, image, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=rows))
        whole = encode(autoencoder, image, WHOLE)
    assert got.shape == expected.shape == (1, 3, *(n // 4 for n in size))
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    if not channels_last:  # the same layout as MONAI's own call: the same arithmetic
        assert torch.equal(whole, expected)


def test_encoder_blocks_that_cannot_run_in_slabs_run_whole():
    autoencoder = _autoencoder(attention_levels=(False, False, True), with_encoder_nonlocal_attn=True)
    image = torch.randn(1, 1, 15, 16, 13, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected = autoencoder.encode(image)[0]
        got = encode(autoencoder, image, DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=3))
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


def test_only_blocks_whose_maps_pass_the_threshold_run_in_slabs(monkeypatch):
    """A 40 KB threshold on a 32^3 image: the full-resolution blocks (8 channels, 1 MB maps) and
    the first downsampling run in slabs, the half-resolution ones (16 channels at 16^3, 256 KB)
    too, the quarter-resolution ones (32 KB) whole; the latent is the same."""
    from VCMSynthesisLib import decoding

    slabbed = []
    run_slabbed = decoding._run_slabbed
    monkeypatch.setattr(decoding, "_run_slabbed",
                        lambda block, x, *rest: slabbed.append(x.length) or run_slabbed(block, x, *rest))
    autoencoder = _autoencoder()
    image = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        expected = autoencoder.encode(image)[0]
        got = encode(autoencoder, image, DecodePlan(slab_bytes=40 * 2**10, slab_rows=4))
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    assert set(slabbed) == {32, 16}  # blocks reading 32 and 16 rows ran in slabs, none reading 8
    assert slabbed.count(32) == 4  # the input convolution, two residual blocks, the downsampling


MEASURE_PEAK = r"""
import json, sys, torch
from pathlib import Path
from monai.networks.nets import AutoencoderKL
from VCMSynthesisLib.decoding import WHOLE, DecodePlan, decode, encode

torch.set_num_threads(1)
torch.manual_seed(0)
autoencoder = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3,
                            channels=(32, 64, 64), num_res_blocks=2, norm_num_groups=8,
                            attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
                            with_decoder_nonlocal_attn=False).eval()
rows = int(sys.argv[3])
plan = {"whole": WHOLE, "slabs": DecodePlan(slab_bytes=32 * 2**20, slab_rows=rows),
        "half": DecodePlan(slab_bytes=32 * 2**20, slab_rows=rows, stored_dtype=torch.float16)}[sys.argv[1]]
if sys.argv[2] == "decode":
    run, x = decode, torch.randn(1, 3, 16, 24, 16)
else:
    run, x = encode, torch.randn(1, 1, 64, 96, 64)

def status_kb(field):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])

with torch.inference_mode():
    run(autoencoder, x[:, :, :8, :8, :8], WHOLE)  # allocator and kernels warmed up
    before = status_kb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    run(autoencoder, x, plan)
print(json.dumps((status_kb("VmHWM:") - before) / 2**10))
"""


def _measured_peaks_mb(network: str, slab_rows: int) -> dict[str, float]:
    """Peak resident memory (MB above the warmed-up process) of a fresh process decoding or
    encoding whole and in slabs. Slabs this small would come from glibc's heap, which keeps freed
    memory; at real sizes (the paper's: 9-18 MB a row) they are above its mmap threshold, as this
    sets it."""
    environment = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
                   "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for plan in ("whole", "slabs", "half"):
        result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, plan, network, str(slab_rows)],
                                capture_output=True, text=True, check=True, env=environment)
        peaks[plan] = json.loads(result.stdout)
    return peaks


def test_slabs_lower_the_measured_peak():
    """Decoding 64x96x64: 64- and 32-channel maps of 100 and 50 MB."""
    peaks = _measured_peaks_mb("decode", slab_rows=8)
    assert peaks["whole"] > 150, peaks  # several full maps
    assert peaks["slabs"] < 0.7 * peaks["whole"], peaks
    assert peaks["half"] < 0.8 * peaks["slabs"], peaks  # the stored maps take half


def test_slabs_lower_the_measured_peak_of_an_encode():
    """Encoding 64x96x64: the first level's 32-channel maps are 50 MB; a residual block in slabs
    still stores two of them (its input, kept for the sum, and its first convolution's output,
    whose statistics the second normalisation needs), the whole-volume encode about four
    (measured 128 and 199 MB; 87 MB with the stored maps in float16)."""
    peaks = _measured_peaks_mb("encode", slab_rows=8)
    assert peaks["whole"] > 150, peaks
    assert peaks["slabs"] < 0.8 * peaks["whole"], peaks
    assert peaks["half"] < 0.8 * peaks["slabs"], peaks


def test_the_plan_takes_the_most_exact_thickest_slabs_that_fit_else_refuses(tmp_path):
    """A base model (no condition encoder) at 256^3: its decoder's 8-channel full-grid maps are
    512 MB; the weights are tiny. Exact float32 slabs first (thickest first), then float16
    storage."""
    folder = make_tiny_model_folder(tmp_path / "tiny", grid=(256, 256, 256), with_adapter=False)
    config = load_model_folder(folder).config
    plans = [DecodePlan(slab_rows=rows, stored_dtype=dtype)
             for dtype in (None, torch.float16) for rows in (8, 4)]
    whole, *needed = (estimate_peak_bytes(config, folder, "cpu", plan) for plan in [WHOLE, *plans])
    assert needed[0] < whole and needed[1] < needed[0] and needed[2] < needed[1] and needed[3] < needed[2]
    assert plan_decode(config, folder, "cpu", available=whole) == plans[0]
    for plan, fits in zip(plans[1:], needed[1:], strict=True):
        assert plan_decode(config, folder, "cpu", available=fits) == plan
    with pytest.raises(UserError, match=r"needs about .* GiB on cpu .* close other programs"):
        plan_decode(config, folder, "cpu", available=needed[3] - 1)
    assert plan_decode(config, folder, "cuda", available=whole) == WHOLE  # autocast: float16 already


def test_the_plan_for_an_edit_counts_the_scan_encode(tmp_path):
    """The same model: its encoder's 4-channel maps at 256^3 are 256 MB, not over the slab
    threshold, so an edit encodes whole (about four maps, more than the decoder's slabs need) and
    needs more than a synthesis. At 256x256x320 (320 MB maps) the encoder runs in slabs too and
    stays under the decoder."""
    folder = make_tiny_model_folder(tmp_path / "tiny", grid=(256, 256, 256), with_adapter=False)
    config = load_model_folder(folder).config
    thickest = DecodePlan(slab_rows=8)
    synthesis = estimate_peak_bytes(config, folder, "cpu", thickest)
    edit = estimate_peak_bytes(config, folder, "cpu", thickest, encodes=True)
    assert edit > synthesis + 2**28
    assert plan_decode(config, folder, "cpu", available=edit, encodes=True) == thickest
    with pytest.raises(UserError, match=r"needs about .* GiB on cpu"):
        plan_decode(config, folder, "cpu", available=synthesis, encodes=True)

    folder = make_tiny_model_folder(tmp_path / "longer", grid=(256, 256, 320), with_adapter=False)
    config = load_model_folder(folder).config
    assert (estimate_peak_bytes(config, folder, "cpu", thickest, encodes=True)
            == estimate_peak_bytes(config, folder, "cpu", thickest))


def test_a_run_with_too_little_memory_to_decode_whole_samples_the_same_image_in_slabs(tmp_path):
    folder = make_tiny_model_folder(tmp_path / "tiny", grid=(32, 32, 32))
    model = load_model_folder(folder)
    condition = torch.rand(1, len(model.config.condition_channel_names), 32, 32, 32,
                           generator=torch.Generator().manual_seed(4))
    whole = sample(model, condition, steps=2, seed=5)
    model.decode_plan = DecodePlan(slab_bytes=EVERY_BLOCK, slab_rows=5)
    slabbed = sample(model, condition, steps=2, seed=5)
    assert np.abs((slabbed - whole).numpy()).max() < 1e-4


@pytest.mark.slow
def test_paper_size_slabs_decode_what_the_whole_volume_decodes():
    """BrainLDM's autoencoder (random weights) at 160x224x160: the planned slab decode against
    MONAI's whole-volume decode (about 3 minutes on 2 cores). They differ by float32 rounding of
    the GroupNorm statistics over 23 M values a group, larger in the whole-volume decode
    (`test_slab_statistics_are_closer_to_double_precision_than_group_norms`): measured mean 1.1e-3
    and at most 0.0135 here, where random weights amplify it; a slab mistake (a wrong halo, row or
    statistic) moves values by tenths. Stored in float16, the maps add their rounding: measured
    mean 1.5e-3 and at most 0.0133."""
    from VCMSynthesisLib.checkpoints import reference_model_config

    autoencoder = frozen(AutoencoderKL(**reference_model_config("paper-sizes").autoencoder.params),
                         torch.device("cpu"))
    latent = torch.randn(1, 3, 20, 28, 20, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected = autoencoder.decode(latent)
        exact = decode(autoencoder, latent, DecodePlan(slab_rows=8))
        half = decode(autoencoder, latent, DecodePlan(slab_rows=8, stored_dtype=torch.float16))
    difference = (exact - expected).abs()
    assert difference.mean() < 2e-3 and difference.max() < 0.02
    difference = (half - expected).abs()
    print(f"float16 storage: mean {difference.mean():.2e}, max {difference.max():.2e}")
    assert difference.mean() < 4e-3 and difference.max() < 0.03


@pytest.mark.slow
def test_paper_size_slabs_encode_what_the_whole_volume_encodes():
    """BrainLDM's autoencoder (random weights) encoding a random 160x224x160 image: the planned
    slab encode against MONAI's whole-volume encode (about 2 minutes on one core). As for the
    decode, they differ by the whole-volume GroupNorm's float32 statistics: measured mean 1.0e-3
    and at most 6.4e-3 here, on latent values of std 0.62; at 128^3 the slabs are 23x closer to an
    encode with float64 GroupNorm than MONAI's is (`bench/bench_encoding.py --grid 128,128,128
    --variants norm64,whole,8`)."""
    from VCMSynthesisLib.checkpoints import reference_model_config

    autoencoder = frozen(AutoencoderKL(**reference_model_config("paper-sizes").autoencoder.params),
                         torch.device("cpu"))
    image = torch.rand(1, 1, 160, 224, 160, generator=torch.Generator().manual_seed(11)) * 2 - 1
    with torch.inference_mode():
        expected = autoencoder.encode(image)[0]
        got = encode(autoencoder, image, DecodePlan(slab_rows=8))
    difference = (got - expected).abs()
    assert difference.mean() < 3e-3 and difference.max() < 0.03


@pytest.mark.slow
def test_slab_statistics_are_closer_to_double_precision_than_group_norms():
    """At the paper's size (a 128-channel map at 80x224x160, channel means 6x the spread) the
    slab statistics normalise closer to float64 than PyTorch's float32 GroupNorm does."""
    from VCMSynthesisLib.decoding import Slabs, _group_stats, _normalize

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 128, 80, 224, 160, generator=generator) * 0.5
    x = x + 3.0 * torch.randn(1, 128, 1, 1, 1, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    norm = torch.nn.GroupNorm(32, 128, eps=1e-6)
    with torch.inference_mode():
        groups = x.contiguous().view(32, -1)
        mean = torch.stack([group.double().mean() for group in groups]).repeat_interleave(4)
        mean = mean.view(1, -1, 1, 1, 1)
        std = torch.stack([group.double().std(unbiased=False) for group in groups]).repeat_interleave(4)
        head = x[:, :, :8]
        exact = (head.double() - mean) / (std.square() + 1e-6).sqrt().view(1, -1, 1, 1, 1)
        native = torch.nn.functional.group_norm(x, 32, eps=1e-6)[:, :, :8]
        slabbed = _normalize(_group_stats(norm, Slabs.split(x, 16)), head)
    assert (slabbed.double() - exact).abs().max() < 0.5 * (native.double() - exact).abs().max()
