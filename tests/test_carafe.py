"""CARAFE: values against a transcription of the official naive CUDA kernel, official mask layout,
near-uniform kernels at init, and the upsampler contract (checked by hand: kind UPSAMPLE)."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import lit_attn
from lit_attn.layers.carafe import CARAFE
from lit_attn.registry import UPSAMPLE

REF = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_refs", "carafe.py")


def official_masks(block, x):
    """CARAFEPack.kernel_normalizer on the encoder output, with pixel_shuffle written out by index."""
    s, k, g = block.scale_factor, block.up_kernel, block.up_group
    enc = block.content_encoder(block.channel_compressor(x))
    n, _, h, w = enc.shape
    cc = torch.arange(g * k * k)[:, None, None]
    ph, pw = torch.arange(h * s)[None, :, None], torch.arange(w * s)[None, None, :]
    mask = enc[:, cc * s * s + (ph % s) * s + pw % s, ph // s, pw // s]  # (n, G k^2, sH, sW)
    return F.softmax(mask.view(n, g, k * k, h * s, w * s), dim=2).view(n, g * k * k, h * s, w * s)


def naive_carafe(x, masks, kernel_size, group_size, scale_factor):
    """The official CARAFENAIVEForward kernel, one output pixel (all channels of a group) at a time."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) // 2
    cg = c // group_size
    out = torch.zeros(n, c, h * scale_factor, w * scale_factor, dtype=x.dtype)
    for ph in range(h * scale_factor):
        for pw in range(w * scale_factor):
            down_ph, down_pw = ph // scale_factor, pw // scale_factor
            for iy in range(down_ph - half, down_ph + half + 1):
                for ix in range(down_pw - half, down_pw + half + 1):
                    if iy < 0 or iy > h - 1 or ix < 0 or ix > w - 1:
                        continue
                    mask_iy, mask_ix = iy - down_ph + half, ix - down_pw + half
                    for g in range(group_size):
                        mask_c = (g * kernel_size + mask_iy) * kernel_size + mask_ix
                        c = slice(g * cg, (g + 1) * cg)
                        out[:, c, ph, pw] += x[:, c, iy, ix] * masks[:, mask_c, ph, pw, None]
    return out


def randomise(block, std=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return block


@pytest.mark.parametrize("kwargs,size", [
    ({}, (4, 5)),
    ({"scale_factor": 3, "up_kernel": 3, "up_group": 2}, (3, 4)),
    ({"encoder_dilation": 2, "compressed_channels": 8, "up_group": 4}, (5, 3)),
    ({}, (1, 1)),
])
def test_matches_official_naive_kernel(kwargs, size):
    block = randomise(CARAFE(8, dtype=torch.float64, **kwargs))
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    masks = official_masks(block, x)
    torch.testing.assert_close(block.kernels(x).flatten(1, 2), masks)  # official channel layout
    out = block(x)
    assert out.shape == (2, 8, size[0] * block.scale_factor, size[1] * block.scale_factor)
    torch.testing.assert_close(out, naive_carafe(x, masks, block.up_kernel, block.up_group, block.scale_factor))


def test_near_uniform_at_init():
    """Encoder N(0, 0.001): ~1/k^2 kernels, output ~ box filter (zero-padded) of a nearest upsample."""
    torch.manual_seed(0)
    block = CARAFE(32)
    x = torch.randn(2, 32, 7, 9)
    kernels = block.kernels(x)
    torch.testing.assert_close(kernels, torch.full_like(kernels, 1 / 25), rtol=0.1, atol=0)
    box = F.avg_pool2d(x, 5, 1, 2, count_include_pad=True)
    torch.testing.assert_close(block(x), F.interpolate(box, scale_factor=2, mode="nearest"), rtol=0, atol=0.02)


def test_matches_unfold_reference():
    spec = importlib.util.spec_from_file_location("bench_ref_carafe", REF)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    block = randomise(lit_attn.create_attn("carafe", 16, up_group=2)).eval()
    ref = mod.REFERENCES["carafe"][0][1](block).eval()
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(block(x), ref(x), rtol=1e-4, atol=1e-5)


def test_upsampler_contract():
    assert lit_attn.get_attn_entry("carafe").kind == UPSAMPLE
    block = randomise(lit_attn.create_attn("carafe", 32)).train()
    for shape in ((2, 32, 7, 9), (1, 32, 1, 1), (3, 32, 2, 13)):
        assert block(torch.randn(shape)).shape == (*shape[:2], 2 * shape[2], 2 * shape[3])
    x = torch.randn(2, 32, 7, 9, requires_grad=True)
    out = block(x)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    block.eval()
    x = x.detach()
    ref = block(x)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
    small = randomise(lit_attn.create_attn("carafe", 32), std=0.1).eval()  # as test_contract's bf16 check
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = small(x)
    assert torch.isfinite(half).all()
    assert (half.float() - small(x)).norm() / small(x).norm() < 5e-2
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(block)(x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="CARAFE.*C=32.*C=16"):
        block(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(32, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        block(torch.randn(1, 32, 0, 8))


def test_meta_device_and_dtype():
    assert all(p.device.type == "meta" for p in CARAFE(32, device="meta").parameters())
    assert all(p.dtype == torch.float64 for p in CARAFE(32, dtype=torch.float64).parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="CARAFE.*up_group=3"):
        CARAFE(32, up_group=3)
    with pytest.raises(ValueError, match="odd"):
        CARAFE(32, up_kernel=4)
    with pytest.raises(ValueError, match="scale_factor"):
        CARAFE(32, scale_factor=0)
