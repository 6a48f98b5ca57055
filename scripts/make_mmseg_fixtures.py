"""Build mmsegmentation's own models and save small equivalence fixtures.

This script is a *fixture generator*. It is never imported by ``lit_attn`` or by the
tests, and mmsegmentation / mmcv / mmengine are never runtime or test dependencies of
the project. It runs only in a scratch virtual environment outside the repository.

What it writes (``tests/fixtures/mmseg/`` by default; see the README written there):

* ``<name>.pth``    a checkpoint in the layout mmengine's ``Runner.save_checkpoint``
                    writes (mmseg 1.x), after mmseg's ``publish_model`` (optimizer
                    dropped): ``{"meta", "state_dict", "message_hub", "param_schedulers"}``.
* ``<name>_io.pt``  ``{"input", "logits", "decode_out", "aux_out", ...,"config"}``:
                    the fixed input (already normalised, i.e. what
                    ``EncoderDecoder.encode_decode`` receives), mmseg's eval logits at
                    the input size, the decode head's raw output at feature resolution,
                    the auxiliary head's output at feature resolution, and a summary.
* ``dnl_v0.pth`` / ``dnl_v0_io.pt``: the DNL model in mmseg **0.x** checkpoint layout
                    (``meta`` with ``mmseg_version``, ``config``, ``CLASSES``, ``PALETTE``),
                    config text from mmseg 0.30.0's own config files.
* ``ocrnet_hr.pth`` / ``ocrnet_hr_io.pt`` / ``ocrnet_hr_v0_meta.json`` / ``ocrnet_hr_zoo_keys.json.gz``:
                    mmseg's HRNet OCRNet (CascadeEncoderDecoder) on timm's hrnet_w18_small layout, state
                    dict in float16, outputs at a size divisible by 32 and at an odd size (with and
                    without mmseg's two-step fuse), the 0.x meta of the same model, and the key shapes
                    of the full-size zoo models (``make_hrnet``; see the README).
* ``README.md``     regenerated from the ``*_io.pt`` files present.

Scratch environment (measured on a 2-core machine; about 40 s of installs, no compilation)::

    mkdir -p /work/scratch && cd /work/scratch
    python3.11 -m venv mmseg-venv                                   # ~4 s
    mmseg-venv/bin/pip install mmcv-lite==2.1.0 mmengine==0.10.7 \\
        mmsegmentation==1.2.2 ftfy regex                            # ~21 s, pure-Python wheels
    # reuse the project's torch (2.14 CPU) instead of installing another one:
    echo /root/.cache/lit_attn/venv/lib/python3.11/site-packages \\
        > mmseg-venv/lib/python3.11/site-packages/zz_lit_attn_torch.pth
    # mmcv-lite has no compiled extension; mmseg.utils imports mmcv.ops, which loads
    # mmcv._ext. A stand-in whose attributes are functions that raise when called:
    cat > mmseg-venv/lib/python3.11/site-packages/mmcv/_ext.py <<'EOF'
    def __getattr__(name):
        if name.startswith('__'):
            raise AttributeError(name)
        def _missing(*args, **kwargs):
            raise RuntimeError(f'mmcv._ext.{name} is not available (mmcv-lite stand-in)')
        _missing.__name__ = name
        return _missing
    EOF
    # sources read for the substitutions below (sdists only, nothing is built):
    mmseg-venv/bin/pip install wheel    # lets pip prepare mmcv's sdist metadata
    mkdir -p src && cd src
    ../mmseg-venv/bin/pip download mmcv==2.1.0 --no-deps --no-binary :all: \\
        --no-build-isolation -d . && tar xzf mmcv-2.1.0.tar.gz
    ../mmseg-venv/bin/pip download mmsegmentation==0.30.0 --no-deps \\
        --no-binary :all: -d . && tar xzf mmsegmentation-0.30.0.tar.gz

Run (from the repository root)::

    /work/scratch/mmseg-venv/bin/python scripts/make_mmseg_fixtures.py \\
        [--out tests/fixtures/mmseg] [--only danet,ccnet,...] \\
        [--mmseg0-src /work/scratch/src/mmsegmentation-0.30.0]

Substitutions (everything else is mmseg 1.2.2 / mmcv 2.1.0 / mmengine 0.10.7 code as
installed):

1. ``mmcv.ops.PSAMask.forward`` (a compiled op; mmcv-lite has no ``_ext``) is replaced,
   for the PSANet fixture only, by ``psamask_forward_loops``: a line-by-line Python
   transcription of mmcv 2.1.0 ``mmcv/ops/csrc/pytorch/cpu/psamask.cpp``
   (``psamask_collect_forward`` / ``psamask_distribute_forward``; the CUDA kernels in
   ``common/cuda/psamask_cuda_kernel.cuh`` use the same index arithmetic). It is checked
   against an independent vectorised formulation (``psamask_reference``) on several
   shapes before use.
2. ``dnl_v0`` uses ``DisentangledNonLocal2dV030``, a transcription of mmseg 0.30.0's
   ``DisentangledNonLocal2d.forward``. Reading the sources showed that this forward is
   identical to mmseg 1.2.2's (and to 0.6.0's and 0.11.0's): all released mmseg versions
   compute ``x + conv_out(y + unary_x)``; none applies ``conv_out`` to each term
   separately. The script asserts that both forwards give bit-identical logits; the
   ``dnl_v0`` fixture differs from ``dnl`` in checkpoint layout and config text only
   (same weights, same input, same logits).
3. SyncBN -> BN in every ``norm_cfg`` (eval mode, so identical maths), reduced widths and
   ``num_classes=5`` (``BASE_CHANNELS``, ``HEADS``, ``AUX_OVERRIDES``, ``NUM_CLASSES``);
   PSANet ``mask_size`` (11, 9) (see README).
4. All floating-point parameters and BN running statistics are re-drawn from a seeded
   generator after building (``randomise_``), so that zero-initialised attention paths
   (Scale gammas, zero-init conv_out/BN, ...) are visible in the logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / 'tests' / 'fixtures' / 'mmseg'
DEFAULT_MMSEG0_SRC = Path('/work/scratch/src/mmsegmentation-0.30.0')

# Input: 65 x 81 -> ResNetV1c-D8 feature maps ceil(65/8) x ceil(81/8) = 9 x 11 (odd).
INPUT_HW = (65, 81)
INPUT_SEED = 20240601
# PSANet also gets an even-sized second input: 64 x 96 -> 8 x 12 features, which takes
# PSAHead's even-size branch (floor shrink, align_corners=False) as the Cityscapes
# 512x1024 config does at 64 x 128.
PSANET_EVEN_HW = (64, 96)
# 5 classes (zoo: 19) keeps the logits small: the dataset config gets
# metainfo=dict(classes=<first 5 Cityscapes classes>, palette=...), as a user training on a
# class subset would write, so meta['dataset_meta'] / CLASSES agree with conv_seg.
NUM_CLASSES = 5
FIXED_TIME = '20240601_000000'

# Widths: every channel count of the R-50-D8 configs divided by 16.
BASE_CHANNELS = 4  # ResNetV1c base_channels (64 in the zoo): stage widths 16/32/64/128
STEM_CHANNELS = 8  # stem 3 -> 4 -> 4 -> 8 (64 in the zoo); != 4 * base keeps layer1.0.downsample
C4 = BASE_CHANNELS * 8 * 4  # stage-4 output channels (2048 in the zoo) -> 128
C3 = BASE_CHANNELS * 4 * 4  # stage-3 output channels (1024 in the zoo) -> 64

ZOO = 'mmseg/.mim/configs'

# name -> (config file under mmseg/.mim/configs, decode-head overrides)
HEADS = OrderedDict([
    ('fcn', ('fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py',
             dict(in_channels=C4, channels=32))),
    ('danet', ('danet/danet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
               dict(in_channels=C4, channels=32, pam_channels=4))),
    ('ccnet', ('ccnet/ccnet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
               dict(in_channels=C4, channels=32))),
    ('isanet', ('isanet/isanet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                dict(in_channels=C4, channels=32, isa_channels=16))),
    ('emanet', ('emanet/emanet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                dict(in_channels=C4, channels=16, ema_channels=32, num_bases=8))),
    ('nonlocal', ('nonlocal_net/nonlocal_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                  dict(in_channels=C4, channels=32))),
    ('dnl', ('dnlnet/dnl_r50-d8_4xb2-80k_cityscapes-512x1024.py',
             dict(in_channels=C4, channels=32))),
    ('gcnet', ('gcnet/gcnet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
               dict(in_channels=C4, channels=32))),
    # mmseg 1.2.2 has the R-50-D8 cascade base config (_base_/models/ocrnet_r50-d8.py)
    # but its zoo configs are R-101 only; we load the R-101 Cityscapes zoo config (which
    # inherits that base) and set depth=50 / resnet50_v1c back, see build_cfg().
    ('ocrnet', ('ocrnet/ocrnet_r101-d8_8xb2-80k_cityscapes-512x1024.py',
                [dict(in_channels=C3, channels=16),
                 dict(in_channels=C4, channels=32, ocr_channels=16)])),
    ('psanet', ('psanet/psanet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                dict(in_channels=C4, channels=32, mask_size=(11, 9)))),
    ('apcnet', ('apcnet/apcnet_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                dict(in_channels=C4, channels=32))),
    ('ann', ('ann/ann_r50-d8_4xb2-80k_cityscapes-512x1024.py',
             dict(in_channels=[C3, C4], channels=32, project_channels=16))),
])
AUX_OVERRIDES = dict(in_channels=C3, channels=16)
ALL_NAMES = list(HEADS) + ['dnl_v0', 'ocrnet_hr']

# Modules whose removal shows that the attention/context path reaches the logits:
# (module path, mode, input index): 'identity' returns the module's input number
# `input index` in place of its output, 'zero' returns zeros of the output's shape.
ABLATIONS = {
    'fcn': [],
    'danet': [('decode_head.pam', 'identity', 0), ('decode_head.cam', 'identity', 0)],
    'ccnet': [('decode_head.cca', 'identity', 0)],
    'isanet': [('decode_head.global_relation', 'identity', 0),
               ('decode_head.local_relation', 'identity', 0)],
    'emanet': [('decode_head.ema_module', 'zero', 0)],
    'nonlocal': [('decode_head.nl_block', 'identity', 0)],
    'dnl': [('decode_head.dnl_block', 'identity', 0)],
    'dnl_v0': [('decode_head.dnl_block', 'identity', 0)],
    'gcnet': [('decode_head.gc_block', 'identity', 0)],
    'ocrnet': [('decode_head.1.object_context_block', 'identity', 0)],
    'psanet': [('decode_head.proj', 'zero', 0)],
    'apcnet': [('decode_head.acm_modules.0', 'zero', 0), ('decode_head.acm_modules.1', 'zero', 0),
               ('decode_head.acm_modules.2', 'zero', 0), ('decode_head.acm_modules.3', 'zero', 0)],
    'ann': [('decode_head.fusion', 'identity', 1), ('decode_head.context', 'identity', 0)],
    'ocrnet_hr': [('decode_head.1.object_context_block', 'identity', 0)],
}


def plain(obj):
    """dicts / lists / str / numbers only (ConfigDict, tuples converted), so the files
    load with ``torch.load(..., weights_only=True)``."""
    return json.loads(json.dumps(obj))


def head_seed(name: str) -> int:
    """Seed of the weight generator of one fixture (dnl_v0 shares dnl's weights)."""
    return zlib.crc32(('mmseg-fixture:' + ('dnl' if name == 'dnl_v0' else name)).encode())


# ----------------------------------------------------------------------------------
# PSAMask: transcription of mmcv 2.1.0 mmcv/ops/csrc/pytorch/cpu/psamask.cpp
# ----------------------------------------------------------------------------------

def psamask_forward_loops(mask_data: torch.Tensor, psa_type: int, mask_size) -> torch.Tensor:
    """``psamask_collect_forward`` (psa_type 0) / ``psamask_distribute_forward`` (1).

    Explicit loops with the C++ kernel's flat index arithmetic, on flat Python lists.
    ``mask_data`` is [num, h_mask * w_mask, h_feature, w_feature]; the output (zeros
    outside the mask window, as ``input.new_zeros`` in mmcv's ``PSAMaskFunction``) is
    [num, h_feature * w_feature, h_feature, w_feature].
    """
    h_mask, w_mask = (mask_size, mask_size) if isinstance(mask_size, int) else mask_size
    num_, channels, h_feature, w_feature = mask_data.size()
    assert channels == h_mask * w_mask
    half_h_mask = (h_mask - 1) // 2
    half_w_mask = (w_mask - 1) // 2
    src = mask_data.detach().contiguous().view(-1).tolist()
    dst = [0.0] * (num_ * h_feature * w_feature * h_feature * w_feature)
    for n in range(num_):
        for h in range(h_feature):
            for w in range(w_feature):
                # effective mask region : [hstart, hend) x [wstart, wend) mask-indexed
                hstart = max(0, half_h_mask - h)
                hend = min(h_mask, h_feature + half_h_mask - h)
                wstart = max(0, half_w_mask - w)
                wend = min(w_mask, w_feature + half_w_mask - w)
                for hidx in range(hstart, hend):
                    for widx in range(wstart, wend):
                        s = ((n * h_mask * w_mask + hidx * w_mask + widx) * h_feature
                             + h) * w_feature + w
                        if psa_type == 0:  # collect
                            d = ((n * h_feature * w_feature
                                  + (hidx + h - half_h_mask) * w_feature
                                  + (widx + w - half_w_mask)) * h_feature * w_feature
                                 + h * w_feature + w)
                        else:  # distribute
                            d = ((n * h_feature * w_feature + h * w_feature + w)
                                 * h_feature * w_feature
                                 + (hidx + h - half_h_mask) * w_feature
                                 + (widx + w - half_w_mask))
                        dst[d] = src[s]
    return torch.tensor(dst, dtype=mask_data.dtype).view(
        num_, h_feature * w_feature, h_feature, w_feature)


def psamask_reference(mask: torch.Tensor, psa_type: int, mask_size) -> torch.Tensor:
    """Independent vectorised formulation used only to check the transcription.

    For a centre (h, w) and a feature position (i, j), the mask entry used is
    (i - h + half_h, j - w + half_w) when it lies inside the mask, else 0.
    collect:    out[n, i * W + j, h, w] = m[n, i - h + half_h, j - w + half_w, h, w]
    distribute: out[n, h * W + w, i, j] = m[n, i - h + half_h, j - w + half_w, h, w]
    """
    h_mask, w_mask = mask_size
    n, c, H, W = mask.shape
    m = mask.view(n, h_mask, w_mask, H, W)
    ii = torch.arange(H)
    jj = torch.arange(W)
    dh = ii[:, None] - ii[None, :] + (h_mask - 1) // 2  # [i, h]
    dw = jj[:, None] - jj[None, :] + (w_mask - 1) // 2  # [j, w]
    vh = (dh >= 0) & (dh < h_mask)
    vw = (dw >= 0) & (dw < w_mask)
    DH = dh.clamp(0, h_mask - 1)[:, None, :, None]
    DW = dw.clamp(0, w_mask - 1)[None, :, None, :]
    HH = ii[None, None, :, None]
    WW = jj[None, None, None, :]
    valid = (vh[:, None, :, None] & vw[None, :, None, :]).to(mask.dtype)
    outs = []
    for b in range(n):
        g = m[b][DH, DW, HH, WW] * valid  # [i, j, h, w]
        if psa_type == 1:
            g = g.permute(2, 3, 0, 1)  # [h, w, i, j]
        outs.append(g.reshape(H * W, H, W))
    return torch.stack(outs)


def check_psamask() -> list:
    gen = torch.Generator().manual_seed(7)
    report = []
    for (H, W, hm, wm) in [(5, 6, 11, 9), (4, 6, 11, 9), (3, 4, 5, 7), (5, 5, 9, 9),
                           (6, 3, 3, 3), (2, 7, 13, 5)]:
        x = torch.randn(2, hm * wm, H, W, generator=gen, dtype=torch.float64)
        for t in (0, 1):
            a = psamask_forward_loops(x, t, (hm, wm))
            b = psamask_reference(x, t, (hm, wm))
            assert torch.equal(a, b), (H, W, hm, wm, t)
        report.append(f'{H}x{W} mask {hm}x{wm}')
    return report


def patch_psamask():
    from mmcv.ops import psa_mask

    def forward(self, input):  # noqa: A002 (mmcv's signature)
        return psamask_forward_loops(input, self.psa_type_enum, self.mask_size)

    psa_mask.PSAMask.forward = forward


# ----------------------------------------------------------------------------------
# DNL: transcription of mmseg 0.30.0 DisentangledNonLocal2d.forward
# ----------------------------------------------------------------------------------

def make_dnl_v030_class():
    from mmseg.models.decode_heads.dnl_head import DisentangledNonLocal2d

    class DisentangledNonLocal2dV030(DisentangledNonLocal2d):
        """mmseg 0.30.0 ``mmseg/models/decode_heads/dnl_head.py`` forward, transcribed.

        ``embedded_gaussian`` (temperature and sqrt scaling) is inherited: it is
        identical in 0.30.0 and 1.2.2.
        """

        def forward(self, x):
            # x: [N, C, H, W]
            n = x.size(0)

            # g_x: [N, HxW, C]
            g_x = self.g(x).view(n, self.inter_channels, -1)
            g_x = g_x.permute(0, 2, 1)

            # theta_x: [N, HxW, C], phi_x: [N, C, HxW]
            if self.mode == 'gaussian':
                theta_x = x.view(n, self.in_channels, -1)
                theta_x = theta_x.permute(0, 2, 1)
                if self.sub_sample:
                    phi_x = self.phi(x).view(n, self.in_channels, -1)
                else:
                    phi_x = x.view(n, self.in_channels, -1)
            elif self.mode == 'concatenation':
                theta_x = self.theta(x).view(n, self.inter_channels, -1, 1)
                phi_x = self.phi(x).view(n, self.inter_channels, 1, -1)
            else:
                theta_x = self.theta(x).view(n, self.inter_channels, -1)
                theta_x = theta_x.permute(0, 2, 1)
                phi_x = self.phi(x).view(n, self.inter_channels, -1)

            # subtract mean
            theta_x -= theta_x.mean(dim=-2, keepdim=True)
            phi_x -= phi_x.mean(dim=-1, keepdim=True)

            pairwise_func = getattr(self, self.mode)
            # pairwise_weight: [N, HxW, HxW]
            pairwise_weight = pairwise_func(theta_x, phi_x)

            # y: [N, HxW, C]
            y = torch.matmul(pairwise_weight, g_x)
            # y: [N, C, H, W]
            y = y.permute(0, 2, 1).contiguous().reshape(n, self.inter_channels,
                                                        *x.size()[2:])

            # unary_mask: [N, 1, HxW]
            unary_mask = self.conv_mask(x)
            unary_mask = unary_mask.view(n, 1, -1)
            unary_mask = unary_mask.softmax(dim=-1)
            # unary_x: [N, 1, C]
            unary_x = torch.matmul(unary_mask, g_x)
            # unary_x: [N, C, 1, 1]
            unary_x = unary_x.permute(0, 2, 1).contiguous().reshape(
                n, self.inter_channels, 1, 1)

            output = x + self.conv_out(y + unary_x)

            return output

    return DisentangledNonLocal2dV030


# ----------------------------------------------------------------------------------
# Config and model
# ----------------------------------------------------------------------------------

def _to_bn(obj):
    """Replace every SyncBN norm_cfg by BN (requires_grad=True), recursively."""
    if isinstance(obj, dict):
        if obj.get('type') == 'SyncBN':
            obj['type'] = 'BN'
            obj['requires_grad'] = True
        for v in obj.values():
            _to_bn(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _to_bn(v)


def _apply_common(cfg, name, decode_over):
    m = cfg.model
    m.backbone.base_channels = BASE_CHANNELS
    m.backbone.stem_channels = STEM_CHANNELS
    if isinstance(m.decode_head, (list, tuple)):
        for head, over in zip(m.decode_head, decode_over, strict=True):
            head.update(over)
            head.num_classes = NUM_CLASSES
    else:
        m.decode_head.update(decode_over)
        m.decode_head.num_classes = NUM_CLASSES
    if m.get('auxiliary_head') is not None:
        m.auxiliary_head.update(AUX_OVERRIDES)
        m.auxiliary_head.num_classes = NUM_CLASSES
    _to_bn(cfg._cfg_dict)
    classes, palette = class_subset()
    if 'train_dataloader' in cfg:  # mmseg 1.x config
        for k in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            cfg[k].dataset.metainfo = dict(classes=classes, palette=palette)
    else:  # mmseg 0.x config
        for k in ('train', 'val', 'test'):
            cfg.data[k].classes = classes
            cfg.data[k].palette = palette


def class_subset():
    from mmseg.datasets import CityscapesDataset
    m = CityscapesDataset.METAINFO
    return tuple(m['classes'][:NUM_CLASSES]), [list(p) for p in m['palette'][:NUM_CLASSES]]


def build_cfg(name):
    """mmseg 1.2.2 zoo config (Config object) with the fixture's changes applied."""
    import mmseg
    from mmengine.config import Config
    base = name if name != 'dnl_v0' else 'dnl'
    rel, over = HEADS[base]
    path = Path(mmseg.__file__).parent / '.mim' / 'configs' / rel
    cfg = Config.fromfile(str(path))
    if base == 'ocrnet':
        cfg.model.backbone.depth = 50
        cfg.model.pretrained = 'open-mmlab://resnet50_v1c'
    _apply_common(cfg, base, over)
    stem = Path(rel).stem
    if base == 'ocrnet':
        stem = stem.replace('r101-d8', 'r50-d8')
    # what mmseg 1.x tools/train.py adds before building the Runner
    cfg.work_dir = f'./work_dirs/{stem}'
    cfg.launcher = 'none'
    return cfg, stem


def build_cfg_v0(mmseg0_src: Path):
    """mmseg 0.30.0 config text (DNL R-50-D8 Cityscapes 80k) with the same changes."""
    from mmengine.config import Config
    path = mmseg0_src / 'mmseg' / '.mim' / 'configs' / 'dnlnet' / 'dnl_r50-d8_512x1024_80k_cityscapes.py'
    if not path.exists():
        raise SystemExit(f'{path} not found: download the mmsegmentation 0.30.0 sdist '
                         '(see the module docstring) or pass --mmseg0-src')
    cfg = Config.fromfile(str(path))
    _apply_common(cfg, 'dnl', HEADS['dnl'][1])
    # what mmseg 0.30 tools/train.py adds before pretty_text goes into the checkpoint
    cfg.work_dir = './work_dirs/dnl_r50-d8_512x1024_80k_cityscapes'
    cfg.gpu_ids = [0]
    cfg.auto_resume = False
    cfg.device = 'cuda'
    cfg.seed = 0
    # mmseg 0.x EncoderDecoder.__init__ writes `backbone.pretrained = pretrained` into the
    # config dict it is given, and 0.30 tools/train.py takes cfg.pretty_text after building
    cfg.model.backbone.pretrained = cfg.model.pretrained
    return cfg


def build_model(cfg):
    """Build from a copy of cfg.model, as mmengine's Runner does (it deep-copies the
    config before building, so the saved cfg text is not touched by the build)."""
    from mmseg.registry import MODELS
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.eval()
    return model


def randomise_(model: nn.Module, seed: int) -> dict:
    """Re-draw every floating-point parameter and BN running statistic (seeded).

    conv / linear weight: N(0, 1 / fan_in); conv / linear bias: N(0, 0.1);
    BN weight U(0.6, 1.2), bias N(0, 0.1), running_mean N(0, 0.1), running_var U(0.5, 1.5);
    LayerNorm / GroupNorm weight U(0.6, 1.2), bias N(0, 0.1);
    mmcv Scale (DANet PAM/CAM gamma, CCNet gamma): U(0.5, 1.0);
    EMANet bases: N(0, 1) then l2-normalised over the channel dim (as EMAModule does).
    """
    from mmcv.cnn import Scale
    gen = torch.Generator().manual_seed(seed)
    done = set()  # ids of the tensors re-drawn (modules shared under two names count once)

    def normal_(t, std):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).mul_(std).to(t.dtype))
        done.add(id(t))

    def uniform_(t, lo, hi):
        t.copy_((torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(t.dtype))
        done.add(id(t))

    counts = dict(conv=0, norm=0, scale=0, bases=0)
    with torch.no_grad():
        for mod in model.modules():  # shared modules are visited once
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                normal_(mod.weight, 1.0 / math.sqrt(fan_in))
                if mod.bias is not None:
                    normal_(mod.bias, 0.1)
                counts['conv'] += 1
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                uniform_(mod.weight, 0.6, 1.2)
                normal_(mod.bias, 0.1)
                normal_(mod.running_mean, 0.1)
                uniform_(mod.running_var, 0.5, 1.5)
                counts['norm'] += 1
            elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
                uniform_(mod.weight, 0.6, 1.2)
                normal_(mod.bias, 0.1)
                counts['norm'] += 1
            elif isinstance(mod, Scale):
                uniform_(mod.scale, 0.5, 1.0)
                counts['scale'] += 1
            if type(mod).__name__ == 'EMAModule':
                b = torch.randn(mod.bases.shape, generator=gen, dtype=torch.float64)
                mod.bases.copy_(F.normalize(b, dim=1, p=2).to(mod.bases.dtype))
                done.add(id(mod.bases))
                counts['bases'] += 1
    tensors = model.state_dict(keep_vars=True)  # every key, shared tensors under each name
    missing = [k for k, v in tensors.items() if v.is_floating_point() and id(v) not in done]
    assert not missing, f'not re-randomised: {missing}'
    return counts


# ----------------------------------------------------------------------------------
# Running mmseg
# ----------------------------------------------------------------------------------

def metas(hw):
    return [dict(img_shape=hw, ori_shape=hw, pad_shape=hw)]


def run_model(model, x):
    """mmseg eval outputs: logits at input size, decode/aux outputs at feature size."""
    with torch.no_grad():
        logits = model.encode_decode(x, metas(tuple(x.shape[2:])))
        feats = model.extract_feat(x)
        extra = {}
        if isinstance(model.decode_head, nn.ModuleList):  # CascadeEncoderDecoder (OCRNet)
            prev = model.decode_head[0].forward(feats)
            decode_out = model.decode_head[1].forward(feats, prev)
            aux_out = prev  # stage-1 FCNHead: OCRNet has no separate auxiliary_head
        else:
            out = model.decode_head.forward(feats)
            if isinstance(out, (tuple, list)):  # DAHead: (pam_cam, pam, cam)
                decode_out = out[0]
                extra['decode_out_pam'] = out[1]
                extra['decode_out_cam'] = out[2]
            else:
                decode_out = out
            aux_out = model.auxiliary_head.forward(feats)
    return logits, decode_out, aux_out, feats, extra


def ablate(model, x, specs):
    """Relative change of the logits when each listed module is removed."""
    res = {}
    with torch.no_grad():
        base = model.encode_decode(x, metas(tuple(x.shape[2:])))
        mods = dict(model.named_modules())
        for path, mode, idx in specs:
            def hook(m, inp, out, mode=mode, idx=idx):
                if mode == 'identity':
                    assert inp[idx].shape == out.shape
                    return inp[idx]
                return torch.zeros_like(out)
            h = mods[path].register_forward_hook(hook)
            alone = model.encode_decode(x, metas(tuple(x.shape[2:])))
            h.remove()
            res[path] = dict(mode=mode, rel_change=float((alone - base).norm() / base.norm()),
                             max_abs=float((alone - base).abs().max()))
    return res


def input_tensor(hw, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, *hw, generator=gen)


def key_structure(sd):
    """Compact key structure: module paths (last component stripped), deduplicated."""
    out = OrderedDict()
    for k, v in sd.items():
        mod, _, leaf = k.rpartition('.')
        out.setdefault(mod, []).append(f'{leaf}{list(v.shape)}')
    return out


# ----------------------------------------------------------------------------------
# Checkpoint layouts
# ----------------------------------------------------------------------------------

def cityscapes_metainfo_1x(cfg):
    """The train dataset's metainfo, which Runner saves as meta['dataset_meta'].

    Built by instantiating mmseg's CityscapesDataset with the config's metainfo (lazy, no
    files read): classes / palette of the subset plus the label_map and
    reduce_zero_label entries BaseSegDataset adds."""
    from mmseg.datasets import CityscapesDataset
    ds = CityscapesDataset(data_root='/nonexistent', data_prefix=dict(img_path='i', seg_map_path='s'),
                           metainfo=copy.deepcopy(cfg.train_dataloader.dataset.metainfo),
                           lazy_init=True, pipeline=[])
    return copy.deepcopy(ds.metainfo)


def checkpoint_1x(model, cfg, stem, fixture_note):
    """What mmengine 0.10.7 Runner.save_checkpoint writes, after mmseg 1.x
    tools/misc/publish_model.py (which deletes only 'optimizer')."""
    import mmengine
    from mmengine.logging import MessageHub
    from mmengine.optim import PolyLR
    iters = 80000
    meta = dict(
        epoch=0,
        iter=iters,
        cfg=cfg.pretty_text,
        seed=0,
        experiment_name=f'{stem}_{FIXED_TIME}',
        time=FIXED_TIME,
        mmengine_version=mmengine.__version__,
        dataset_meta=cityscapes_metainfo_1x(cfg),
        lit_attn_fixture=fixture_note,
    )
    hub = MessageHub.get_instance(f'fixture-{stem}')
    hub.update_info('iter', iters)
    hub.update_info('epoch', 0)
    hub.update_info('max_iters', iters)
    hub.update_info('max_epochs', 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    sched = PolyLR(opt, eta_min=1e-4, power=0.9, begin=0, end=iters, by_epoch=False)
    return {
        'meta': meta,
        'state_dict': OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items()),
        'message_hub': hub.state_dict(),
        'param_schedulers': [sched.state_dict()],
    }


def checkpoint_0x(model, cfg, fixture_note, exp='dnl_r50-d8_512x1024_80k_cityscapes'):
    """What mmseg 0.30 tools/train.py + mmcv 1.x IterBasedRunner.save_checkpoint write,
    after tools/publish_model.py (optimizer deleted). The versions and times are those a
    0.30 run would write; no mmseg 0.x / mmcv-full 1.x runtime was involved."""
    classes, palette = class_subset()
    text = cfg.pretty_text
    meta = OrderedDict(
        env_info='(synthetic fixture: written by scripts/make_mmseg_fixtures.py from mmseg '
                 '1.2.2 modules; mmseg 0.x layout)',
        seed=0,
        exp_name=f'{exp}.py',
        mmseg_version='0.30.0',
        config=text,
        CLASSES=classes,
        PALETTE=palette,
        hook_msgs=dict(last_ckpt=f'./work_dirs/{exp}/iter_80000.pth'),
        epoch=1,
        iter=80000,
        mmcv_version='1.7.1',
        time='Sat Jun  1 00:00:00 2024',
        lit_attn_fixture=fixture_note,
    )
    return {
        'meta': dict(meta),
        'state_dict': OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items()),
    }


def verify_roundtrip(ckpt, x, logits):
    """Rebuild the model from the config text stored in the checkpoint, load the state
    dict strictly, and check that mmseg gives the same logits (bit-identical)."""
    from mmengine.config import Config
    text = ckpt['meta'].get('cfg', ckpt['meta'].get('config'))
    cfg = Config.fromstring(text, '.py')
    cfg.model.pop('pretrained', None)
    cfg.model.backbone.pop('pretrained', None)
    model = build_model(cfg)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    model.eval()
    with torch.no_grad():
        again = model.encode_decode(x, metas(tuple(x.shape[2:])))
    assert torch.equal(again, logits), float((again - logits).abs().max())
    return 'model rebuilt from meta config text + strict load_state_dict: logits bit-identical'


# ----------------------------------------------------------------------------------
# One fixture
# ----------------------------------------------------------------------------------

def make_one(name, out_dir: Path, mmseg0_src: Path, psamask_checks):
    if name == 'ocrnet_hr':
        return make_hrnet(out_dir, mmseg0_src)
    import mmcv
    import mmengine
    import mmseg
    torch.manual_seed(0)
    cfg, stem = build_cfg(name)
    model = build_model(cfg)
    subs = ['SyncBN -> BN (eval mode)', 'widths / num_classes reduced (see widths)',
            'all float params and BN stats re-randomised (seeded)']
    if name == 'psanet':
        subs.append('mmcv.ops.PSAMask.forward -> psamask_forward_loops (Python transcription '
                    'of mmcv 2.1.0 csrc/pytorch/cpu/psamask.cpp, checked against an '
                    'independent vectorised formulation on ' + '; '.join(psamask_checks) + ')')
    counts = randomise_(model, head_seed(name))
    model.eval()

    x = input_tensor(INPUT_HW, INPUT_SEED)
    logits, decode_out, aux_out, feats, extra = run_model(model, x)

    # same maths in float64: the size of float32 rounding in this model
    m64 = copy.deepcopy(model).double()
    logits64, decode64, aux64, _, _ = run_model(m64, x.double())
    f32_vs_f64 = float((logits.double() - logits64).abs().max())

    if name == 'dnl_v0':
        # swap in the 0.30.0 forward and check it is bit-identical to 1.2.2's
        cls = make_dnl_v030_class()
        model.decode_head.dnl_block.__class__ = cls
        logits_v0, decode_v0, _, _, _ = run_model(model, x)
        assert torch.equal(logits_v0, logits) and torch.equal(decode_v0, decode_out), \
            'mmseg 0.30 DNL forward differs from 1.2.2'
        subs.append('decode_head.dnl_block forward -> DisentangledNonLocal2dV030 (transcribed '
                    'mmseg 0.30.0 forward; bit-identical to 1.2.2: asserted)')

    abl = ablate(model, x, ABLATIONS[name])

    widths = dict(base_channels=BASE_CHANNELS, stem_channels=STEM_CHANNELS,
                  stage_out_channels=[BASE_CHANNELS * 4 * 2 ** i for i in range(4)],
                  num_classes=NUM_CLASSES)
    dh = cfg.model.decode_head
    heads = dh if isinstance(dh, (list, tuple)) else [dh]
    widths['decode_head'] = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in h.items()
         if k not in ('loss_decode', 'norm_cfg')} for h in heads]
    if cfg.model.get('auxiliary_head') is not None:
        widths['auxiliary_head'] = {k: v for k, v in cfg.model.auxiliary_head.items()
                                    if k not in ('loss_decode', 'norm_cfg')}
    summary = dict(
        name=name,
        mmseg_config=('mmseg 0.30.0 configs/dnlnet/dnl_r50-d8_512x1024_80k_cityscapes.py'
                      if name == 'dnl_v0' else f'mmseg 1.2.2 configs/{HEADS[name][0]}'),
        segmentor=cfg.model.type,
        checkpoint_layout='mmseg 0.x (mmcv 1.x runner)' if name == 'dnl_v0' else
        'mmseg 1.x (mmengine Runner)',
        versions=dict(mmseg=mmseg.__version__, mmcv=mmcv.__version__,
                      mmengine=mmengine.__version__, torch=torch.__version__),
        widths=widths,
        input_hw=list(INPUT_HW), input_seed=INPUT_SEED, weight_seed=head_seed(name),
        input_note='N(0,1) tensor given directly to EncoderDecoder.encode_decode, i.e. '
                   'already past data_preprocessor (mean/std normalisation, bgr_to_rgb)',
        feature_hw=[list(f.shape[2:]) for f in feats],
        align_corners=bool(heads[-1].align_corners),
        randomised=counts,
        ablation=abl,
        f32_vs_f64_logits_max_abs=f32_vs_f64,
        logits_std=float(logits.std()),
        decode_out_std=float(decode_out.std()),
        substitutions=subs,
    )
    if name == 'psanet':
        summary['psanet'] = dict(
            mask_size=[11, 9],
            note='odd 9x11 features -> shrink to 5x6 with align_corners=True (as the '
                 '769x769 configs); even input 64x96 -> 8x12 -> 4x6 with '
                 'align_corners=False (as the 512x1024 Cityscapes configs at 64x128). '
                 'Mask 11x9: taller than the 2h-1 window needed (full coverage in H), '
                 'narrower than 2w-1 (partial coverage in W), as 97x97 is for the 32x64 '
                 'shrunk map of the 512x1024 config.')
    fixture_note = plain(dict(generator='scripts/make_mmseg_fixtures.py', name=name,
                              weight_seed=head_seed(name), substitutions=subs, widths=widths))

    io = {'input': x, 'logits': logits, 'decode_out': decode_out, 'aux_out': aux_out,
          'decode_out_f64': decode64, 'aux_out_f64': aux64}
    io.update(extra)
    if name == 'psanet':
        xe = input_tensor(PSANET_EVEN_HW, INPUT_SEED + 1)
        le, de, ae, fe, _ = run_model(model, xe)
        io.update(input_even=xe, logits_even=le, decode_out_even=de, aux_out_even=ae)
        summary['psanet']['even_input_hw'] = list(PSANET_EVEN_HW)
        summary['psanet']['even_feature_hw'] = list(fe[-1].shape[2:])
        summary['psanet']['even_input_seed'] = INPUT_SEED + 1
        summary['psanet']['even_ablation'] = ablate(model, xe, ABLATIONS[name])

    if name == 'dnl_v0':
        cfg0 = build_cfg_v0(mmseg0_src)
        ckpt = checkpoint_0x(model, cfg0, fixture_note)
        # the dnl_block class swap is not part of the state dict
    else:
        ckpt = checkpoint_1x(model, cfg, stem, fixture_note)
    summary['state_dict_keys'] = len(ckpt['state_dict'])
    summary['key_structure'] = {k: v for k, v in key_structure(ckpt['state_dict']).items()
                                if not k.startswith('backbone.')}
    summary['backbone_modules'] = sorted({'.'.join(k.split('.')[:3])
                                          for k in ckpt['state_dict'] if k.startswith('backbone.')})
    summary['roundtrip'] = verify_roundtrip(ckpt, x, logits)

    out_dir.mkdir(parents=True, exist_ok=True)
    io['config'] = plain(summary)
    torch.save(ckpt, out_dir / f'{name}.pth')
    torch.save(io, out_dir / f'{name}_io.pt')
    sizes = {f: (out_dir / f).stat().st_size for f in (f'{name}.pth', f'{name}_io.pt')}
    summary['file_sizes'] = sizes
    io['config'] = plain(summary)
    torch.save(io, out_dir / f'{name}_io.pt')  # again, with the sizes in the summary
    return summary


# ----------------------------------------------------------------------------------
# HRNet OCRNet (`ocrnet_hr`): mmseg's CascadeEncoderDecoder on its HRNet backbone
# ----------------------------------------------------------------------------------

# mmseg's hr18s config (= timm's hrnet_w18_small_v2 layout), with the backbone set to timm's
# smallest HRNet, hrnet_w18_small (1.48 M trunk parameters): the converter needs a trunk timm
# registers, and every timm HRNet has its widths fixed by name.
HRNET_CFG = 'ocrnet/ocrnet_hr18s_4xb2-80k_cityscapes-512x1024.py'
HRNET_CFG_V0 = 'ocrnet/ocrnet_hr18s_512x1024_80k_cityscapes.py'
HRNET_EXTRA = dict(
    stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(1, ), num_channels=(32, )),
    stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(2, 2), num_channels=(16, 32)),
    stage3=dict(num_modules=1, num_branches=3, block='BASIC', num_blocks=(2, 2, 2), num_channels=(16, 32, 64)),
    stage4=dict(num_modules=1, num_branches=4, block='BASIC', num_blocks=(2, 2, 2, 2),
                num_channels=(16, 32, 64, 128)))
HRNET_BRANCHES = [16, 32, 64, 128]
# stage 1 FCNHead: channels = sum of the branches (as the zoo's sum([18, 36, 72, 144])); OCRHead
# 512 / 256 (zoo) -> 16 / 8
HRNET_HEADS = [dict(in_channels=HRNET_BRANCHES, channels=sum(HRNET_BRANCHES)),
               dict(in_channels=HRNET_BRANCHES, channels=16, ocr_channels=8)]
HRNET_INPUT_HW = (64, 96)  # divisible by 32: every branch exactly halves (see the README)
HRNET_ODD_HW = (33, 49)    # branches 9x13, 5x7, 3x4, 2x2: mmseg's two-step fuse differs
# full-size zoo configs whose state-dict keys and shapes are recorded (built on the meta device)
HRNET_ZOO = OrderedDict([
    ('hr18s', 'ocrnet/ocrnet_hr18s_4xb2-80k_cityscapes-512x1024.py'),
    ('hr18', 'ocrnet/ocrnet_hr18_4xb2-80k_cityscapes-512x1024.py'),
    ('hr48', 'ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py'),
    ('hr48_ade20k', 'ocrnet/ocrnet_hr48_4xb4-80k_ade20k-512x512.py'),
])


def build_cfg_hrnet(v0_src: Path | None = None):
    """(config, experiment stem) of the HRNet OCRNet fixture: mmseg 1.2.2's zoo config, or with
    `v0_src` mmseg 0.30.0's, with the backbone / head widths above, 5 classes and BN."""
    import mmseg
    from mmengine.config import Config
    rel = HRNET_CFG if v0_src is None else HRNET_CFG_V0
    root = Path(mmseg.__file__).parent if v0_src is None else v0_src / 'mmseg'
    path = root / '.mim' / 'configs' / rel
    if not path.exists():
        raise SystemExit(f'{path} not found (see the module docstring for the 0.30.0 sdist)')
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.extra = copy.deepcopy(HRNET_EXTRA)
    for head, over in zip(cfg.model.decode_head, HRNET_HEADS, strict=True):
        head.update(copy.deepcopy(over))
        head.num_classes = NUM_CLASSES
    _to_bn(cfg._cfg_dict)
    classes, palette = class_subset()
    stem = Path(rel).stem
    cfg.work_dir = f'./work_dirs/{stem}'
    if v0_src is None:
        for k in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            cfg[k].dataset.metainfo = dict(classes=classes, palette=palette)
        cfg.launcher = 'none'
    else:  # as build_cfg_v0: what 0.30 tools/train.py adds
        for k in ('train', 'val', 'test'):
            cfg.data[k].classes = classes
            cfg.data[k].palette = palette
        cfg.gpu_ids = [0]
        cfg.auto_resume = False
        cfg.device = 'cuda'
        cfg.seed = 0
        cfg.model.backbone.pretrained = cfg.model.pretrained
    return cfg, stem


def one_step_fuse_(model):
    """mmseg's HRModule fuse with its `Upsample` (bilinear x2^k) replaced by nn.Identity: the
    branch is then resized once, bilinearly to the target size (the official HRNetV2 fuse, and
    timm + lit_attn's use_official_fuse). Returns the number of Upsample modules replaced."""
    from mmseg.models.utils import Upsample
    n = 0
    for mod in model.modules():
        if type(mod).__name__ == 'HRModule' and mod.fuse_layers is not None:
            for outer in mod.fuse_layers:
                for f in outer:
                    if isinstance(f, nn.Sequential) and isinstance(f[-1], Upsample):
                        f[-1] = nn.Identity()
                        n += 1
    return n


def zoo_key_shapes():
    """{tag: {config, keys: {key: shape}}} of the full-size zoo models (19 / 150 classes)."""
    import mmseg
    from mmengine.config import Config
    from mmseg.registry import MODELS
    out = OrderedDict()
    for tag, rel in HRNET_ZOO.items():
        cfg = Config.fromfile(str(Path(mmseg.__file__).parent / '.mim' / 'configs' / rel))
        _to_bn(cfg._cfg_dict)
        with torch.device('meta'):
            model = MODELS.build(copy.deepcopy(cfg.model))
        out[tag] = dict(config=f'mmseg 1.2.2 configs/{rel}',
                        keys={k: list(v.shape) for k, v in model.state_dict().items()})
    return out


def make_hrnet(out_dir: Path, mmseg0_src: Path):
    import gzip

    import mmcv
    import mmengine
    import mmseg
    name = 'ocrnet_hr'
    torch.manual_seed(0)
    cfg, stem = build_cfg_hrnet()
    model = build_model(cfg)
    counts = randomise_(model, head_seed(name))
    with torch.no_grad():  # fp16-representable values, so the checkpoint can be stored in float16
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    model.eval()
    subs = ['SyncBN -> BN (eval mode)', 'backbone extra = timm hrnet_w18_small layout; head widths '
            'reduced; num_classes 5 (see widths)', 'all float params and BN stats re-randomised '
            '(seeded), rounded to float16 and stored as float16 (mmseg runs them in float32)']

    x = input_tensor(HRNET_INPUT_HW, INPUT_SEED)
    logits, decode_out, aux_out, feats, _ = run_model(model, x)
    m64 = copy.deepcopy(model).double()
    logits64, decode64, aux64, _, _ = run_model(m64, x.double())
    f32_vs_f64 = float((logits.double() - logits64).abs().max())
    xo = input_tensor(HRNET_ODD_HW, INPUT_SEED + 2)
    logits_odd, decode_odd, aux_odd, feats_odd, _ = run_model(model, xo)
    abl = ablate(model, x, ABLATIONS[name])

    one = copy.deepcopy(model)
    n_up = one_step_fuse_(one)
    logits_one, _, _, _, _ = run_model(one, x)
    assert torch.equal(logits_one, logits), 'two-step and one-step fuse differ at a size divisible by 32'
    logits_odd_one, decode_odd_one, aux_odd_one, _, _ = run_model(one, xo)
    fuse_diff = float((logits_odd_one - logits_odd).abs().max())

    widths = dict(backbone_extra=plain(HRNET_EXTRA), branches=HRNET_BRANCHES, num_classes=NUM_CLASSES,
                  timm_trunk='hrnet_w18_small',
                  decode_head=[{k: (list(v) if isinstance(v, tuple) else v) for k, v in h.items()
                                if k not in ('loss_decode', 'norm_cfg')} for h in cfg.model.decode_head])
    summary = dict(
        name=name, mmseg_config=f'mmseg 1.2.2 configs/{HRNET_CFG}', segmentor=cfg.model.type,
        checkpoint_layout='mmseg 1.x (mmengine Runner), state dict in float16',
        versions=dict(mmseg=mmseg.__version__, mmcv=mmcv.__version__, mmengine=mmengine.__version__,
                      torch=torch.__version__),
        widths=widths, input_hw=list(HRNET_INPUT_HW), input_seed=INPUT_SEED,
        odd_input_hw=list(HRNET_ODD_HW), odd_input_seed=INPUT_SEED + 2, weight_seed=head_seed(name),
        input_note='N(0,1) tensor given directly to encode_decode (already normalised)',
        feature_hw=[list(f.shape[2:]) for f in feats], odd_feature_hw=[list(f.shape[2:]) for f in feats_odd],
        align_corners=bool(cfg.model.decode_head[-1].align_corners), randomised=counts, ablation=abl,
        f32_vs_f64_logits_max_abs=f32_vs_f64, logits_std=float(logits.std()),
        decode_out_std=float(decode_out.std()), substitutions=subs,
        fuse=dict(upsample_modules=n_up, divisible_size='one-step fuse logits bit-identical (asserted)',
                  odd_size_logits_max_abs_two_step_vs_one_step=fuse_diff,
                  odd_size_logits_std=float(logits_odd.std())))
    fixture_note = plain(dict(generator='scripts/make_mmseg_fixtures.py', name=name,
                              weight_seed=head_seed(name), substitutions=subs, widths=widths))
    half = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items())
    ckpt = checkpoint_1x(model, cfg, stem, fixture_note)
    ckpt['state_dict'] = half
    summary['state_dict_keys'] = len(half)
    summary['key_structure'] = {k: v for k, v in key_structure(half).items() if not k.startswith('backbone.')}
    summary['backbone_modules'] = sorted({'.'.join(k.split('.')[:3]) for k in half if k.startswith('backbone.')})
    summary['roundtrip'] = verify_roundtrip(ckpt, x, logits)

    # mmseg 0.x layout: the same state dict with 0.30.0's meta (its own config file); only the
    # meta is stored (the tests pair it with the 1.x file's state dict)
    cfg0, stem0 = build_cfg_hrnet(mmseg0_src)
    ckpt0 = checkpoint_0x(model, cfg0, fixture_note, exp=stem0)
    ckpt0['state_dict'] = half
    summary['roundtrip_v0'] = verify_roundtrip(ckpt0, x, logits)
    summary['v0_config'] = f'mmseg 0.30.0 configs/{HRNET_CFG_V0}'

    out_dir.mkdir(parents=True, exist_ok=True)
    io = {'input': x, 'logits': logits, 'decode_out': decode_out, 'aux_out': aux_out,
          'decode_out_f64': decode64, 'aux_out_f64': aux64,
          'input_odd': xo, 'logits_odd': logits_odd, 'decode_out_odd': decode_odd, 'aux_out_odd': aux_odd,
          'logits_odd_one_step_fuse': logits_odd_one, 'decode_out_odd_one_step_fuse': decode_odd_one,
          'aux_out_odd_one_step_fuse': aux_odd_one}
    files = {f'{name}.pth': ckpt, f'{name}_io.pt': io}
    torch.save(ckpt, out_dir / f'{name}.pth')
    (out_dir / f'{name}_v0_meta.json').write_text(json.dumps(plain(ckpt0['meta']), indent=1) + '\n')
    with gzip.GzipFile(out_dir / f'{name}_zoo_keys.json.gz', 'wb', mtime=0) as f:
        f.write(json.dumps(zoo_key_shapes(), separators=(',', ':')).encode())
    io['config'] = plain(summary)
    torch.save(io, out_dir / f'{name}_io.pt')
    sizes = {f: (out_dir / f).stat().st_size for f in (*files, f'{name}_v0_meta.json', f'{name}_zoo_keys.json.gz')}
    summary['file_sizes'] = sizes
    io['config'] = plain(summary)
    torch.save(io, out_dir / f'{name}_io.pt')
    return summary


# ----------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------

README_HEAD = """# mmsegmentation equivalence fixtures

Generated by `scripts/make_mmseg_fixtures.py` (see its docstring for the scratch
environment: mmsegmentation 1.2.2, mmcv-lite 2.1.0 with a stand-in `mmcv/_ext.py`,
mmengine 0.10.7, the project's torch). mmseg is **not** a dependency of lit_attn or of
the tests: these files are all the tests need. This README is regenerated by the script.

## What each model is

mmseg's own `EncoderDecoder` (OCRNet: `CascadeEncoderDecoder`, `num_stages=2`), built by
`mmseg.registry.MODELS.build(cfg.model)` after `register_all_modules()`, from the zoo
config `configs/<head>/<head>_r50-d8_4xb2-80k_cityscapes-512x1024.py` of mmseg 1.2.2
(OCRNet: `ocrnet_r101-d8_8xb2-80k_cityscapes-512x1024.py`, which inherits
`_base_/models/ocrnet_r50-d8.py`, with `depth=50` and `resnet50_v1c` set back; mmseg's zoo
has no R-50 OCRNet). Changes, and nothing else:

- ResNetV1c-D8 (depth 50, dilations (1,1,2,4), strides (1,2,1,1), contract_dilation)
  with `base_channels=4`, `stem_channels=8`: stem 3->4->4->8, stage outputs
  16/32/64/128 (zoo: 64, 256/512/1024/2048). `stem_channels != 4*base_channels`, so
  `backbone.layer1.0.downsample` exists as in the real R-50.
- Every head width divided by 16 (512->32, 256->16, 64->4; EMANet `num_bases` 64->8),
  see the table;
  `num_classes=5` (the first 5 Cityscapes classes, set as the datasets' `metainfo` in
  the config, so `dataset_meta` / `CLASSES` agree). Other values as in the config (dropout 0.1, eval mode
  disables it; align_corners False; auxiliary FCNHead on stage 3, 1 conv, no concat).
- SyncBN -> BN (`dict(type='BN', requires_grad=True)`) everywhere.
- All floating-point parameters and BN running statistics re-drawn with a seeded
  generator (`randomise_` in the script): conv/linear weight N(0, 1/fan_in), bias
  N(0, 0.1); BN weight U(0.6, 1.2), bias N(0, 0.1), running_mean N(0, 0.1), running_var
  U(0.5, 1.5); LayerNorm weight U(0.6, 1.2), bias N(0, 0.1); mmcv `Scale` gammas (DANet
  PAM/CAM, CCNet) U(0.5, 1.0); EMANet `bases` N(0,1) then l2-normalised over channels.
  So zero-initialised attention paths are live; the "attention effect" column shows it.
- PSANet: `mask_size=(11, 9)` (zoo (97, 97)), and `mmcv.ops.PSAMask.forward` replaced
  by a Python transcription of mmcv 2.1.0's CPU kernel (below).

## Input and outputs (`<name>_io.pt`)

- `input`: `torch.randn(1, 3, 65, 81)` with `torch.Generator().manual_seed(20240601)`.
  It is fed directly to `model.encode_decode(input, [dict(img_shape=(65, 81),
  ori_shape=(65, 81), pad_shape=(65, 81))])`, i.e. it stands for an image already past
  `data_preprocessor` (mean/std normalisation). Feature maps: stem 33x41, stage 1
  17x21, stages 2-4 9x11 (`ceil(H/8)`), odd on purpose.
- `logits`: mmseg's eval logits `(1, 5, 65, 81)` (bilinear resize of the decode head
  output, `align_corners=False`), float32.
- `decode_out`: the decode head's output at feature resolution `(1, 5, 9, 11)`
  (`decode_head.forward(feats)`; DAHead: the `pam_cam` output, with `decode_out_pam` and
  `decode_out_cam` also saved; OCRNet: `decode_head[1].forward(feats, decode_head[0](feats))`).
- `aux_out`: `auxiliary_head.forward(feats)` at feature resolution `(1, 5, 9, 11)`
  (OCRNet has no auxiliary_head: `aux_out` is its stage-1 FCNHead `decode_head[0]`).
- `decode_out_f64`, `aux_out_f64`: the same model run in float64 (reference without
  float32 rounding; `config['f32_vs_f64_logits_max_abs']` gives the float32 noise).
- PSANet only: `input_even` (`randn(1, 3, 64, 96)`, seed 20240602), `logits_even`,
  `decode_out_even`, `aux_out_even`: 8x12 features take PSAHead's even branch.
- `config`: summary dict: widths, seeds, versions, feature sizes, ablation results,
  substitutions, key structure, file sizes.

## Checkpoints (`<name>.pth`)

mmseg 1.x layout, as mmengine 0.10.7 `Runner.save_checkpoint` writes it after mmseg's
`tools/misc/publish_model.py` (which deletes only `optimizer`):
`{'meta': {epoch, iter, cfg (Config.pretty_text: full config text with
_base_ merged), seed, experiment_name, time, mmengine_version, dataset_meta (classes,
palette, label_map, reduce_zero_label), lit_attn_fixture}, 'state_dict', 'message_hub',
'param_schedulers'}`. `lit_attn_fixture` is ours (generator, seed, substitutions); a
converter should ignore unknown meta keys. `state_dict` has no `data_preprocessor.*`
keys (its mean/std buffers are not persistent).

Note for the converter: mmseg 1.x's model zoo for these R-50/101-D8 heads still serves
the **0.x-era** checkpoints (e.g. `v0.5/danet/...pth` in `configs/danet/metafile.yaml`),
so real downloads have the 0.x layout of `dnl_v0.pth` (`meta` with `mmseg_version`,
`config`, `CLASSES`, `PALETTE`, ...). The state-dict key names are the same in both
layouts (the head modules of mmseg 0.30.0 and 1.2.2 differ only in registry / loss code).

Every checkpoint was checked by rebuilding the model from the config text stored in its
own meta (`Config.fromstring`, mmseg 1.2.2 registry; for `dnl_v0` the 0.x config text
builds too), `load_state_dict(strict=True)`, and comparing logits (bit-identical). All
files load with `torch.load(path, weights_only=True)` (meta and summaries are plain
dicts / lists / tuples / str / numbers).

`dnl_v0.pth`: 0.x layout: `{'meta': {env_info, seed, exp_name, mmseg_version='0.30.0',
config (pretty_text of mmseg 0.30.0's own `dnl_r50-d8_512x1024_80k_cityscapes.py` with the
same changes), CLASSES, PALETTE, hook_msgs, epoch, iter, mmcv_version='1.7.1', time,
lit_attn_fixture}, 'state_dict'}`. The version/time values are what a 0.30 run writes;
no mmseg 0.x or mmcv-full 1.x was run. Same weights, input and logits as `dnl`.

## Substitutions

- **PSAMask** (PSANet only): mmcv's `PSAMask` calls the compiled `_ext.psamask_forward`.
  Its `forward` is monkeypatched with `psamask_forward_loops`, a loop-by-loop Python
  transcription of `psamask_collect_forward` / `psamask_distribute_forward` in mmcv 2.1.0
  `mmcv/ops/csrc/pytorch/cpu/psamask.cpp` (the CUDA kernel in
  `common/cuda/psamask_cuda_kernel.cuh` uses the same indices). Output zeros outside the
  window, like `input.new_zeros` in `PSAMaskFunction`. It is checked for exact equality
  against an independent vectorised formulation (`psamask_reference`) on 6 shapes,
  mask smaller and larger than 2H-1 / 2W-1, both types.
  collect: `out[n, i*W+j, h, w] = m[n, (i-h+hh)*wm + (j-w+hw), h, w]`;
  distribute: `out[n, h*W+w, i, j] = m[n, (i-h+hh)*wm + (j-w+hw), h, w]`, with
  `hh=(hm-1)//2`, `hw=(wm-1)//2`, zero when the mask index is outside the mask.
- **DNL 0.x** (`dnl_v0` only): `DisentangledNonLocal2dV030` transcribes mmseg 0.30.0's
  `DisentangledNonLocal2d.forward`. It is identical to mmseg 1.2.2's: every released
  mmseg with DNL (checked: 0.6.0, 0.11.0, 0.30.0, 1.2.2) computes
  `x + conv_out(y + unary_x)` (conv_out + its BN applied once, to the sum). The
  statement that 0.x applies conv_out to each term separately does not match any
  released source; the script asserts bit-identical logits.

## Things a converter has to get right (read from mmseg 1.2.2 / mmcv 2.1.0, checked by these files)

- Backbone: ResNetV1c, deep stem `stem.{0,3,6}` convs (3->s/2->s/2->s, no bias) with BNs
  `stem.{1,4,7}`, then max-pool; bottleneck stride on the 3x3 conv (`style='pytorch'`);
  D8: layer3 stride 1 dilation 2, layer4 stride 1 dilation 4, and `contract_dilation`
  gives the first block of layer3 dilation 1 and of layer4 dilation 2 (padding = dilation).
  `layerK.0.downsample` = 1x1 conv (stride 2 in layer2 only) + BN. timm's
  `ResNet(Bottleneck, [3,4,6,3], stem_type='deep', stem_width=4, channels=(4,8,16,32),
  output_stride=8)` has the same structure at these widths.
- PSANet: `proj` is a **1x1 ConvModule with padding=1** (its output is 2 px larger in
  each dim) and is then resized to the feature size with the `align_corners` that the
  shrink step picked (True when both h and w are odd, else False), not the config's.
  The PSAMask output is zero outside each window and the softmax runs over all h*w
  positions including those zeros (they are logits 0, not -inf).
- ANN: APNB (`decode_head.context.stages.0`) has `share_key_query=True`: the state dict
  holds `key_project.*` and `query_project.*`, the same tensors under both names.
- DANet: inference uses the `pam_cam` output (`conv_seg`); `pam_conv_seg` /
  `cam_conv_seg` exist in the state dict but only feed training losses. CAM uses
  `softmax(max(energy) - energy)`.
- OCRNet: `decode_head.0` (FCNHead on stage 3) gives the soft object regions used by
  `decode_head.1` (OCRHead); there is no `auxiliary_head`.
- EMANet: `decode_head.ema_module.bases` is a buffer `[1, ema_channels, num_bases]`;
  eval never updates it. `ema_mid_conv` has a bias and no norm.
- ISANet: 9x11 maps are zero-padded to 16x16 (`down_factor=(8, 8)`, pad split
  floor/ceil: top 3, bottom 4, left 2, right 3) before the two relations.

## HRNet OCRNet (`ocrnet_hr`, for lit_attn's `hrnet_ocr`)

mmseg's `CascadeEncoderDecoder` from the zoo config `ocrnet/ocrnet_hr18s_4xb2-80k_cityscapes-512x1024.py`
(mmseg 1.2.2): HRNet backbone, `decode_head.0` = FCNHead (resize_concat of the four branches, 1x1 conv
`channels = sum(in_channels)`, num_convs 1, no concat, dropout -1), `decode_head.1` = OCRHead (resize_concat,
3x3 `bottleneck`, ObjectAttentionBlock, dropout -1). Changes, and nothing else:

- backbone `extra` = timm's `hrnet_w18_small` layout (stage 1: 1 bottleneck of 32; stages 2-4: one module each,
  2 basic blocks per branch, branches 16/32/64/128). Every timm HRNet has its widths fixed by name, and the
  converter builds a registered timm trunk, so the smallest one is used (1.48 M trunk parameters); the zoo's
  hr18s is timm's `hrnet_w18_small_v2`, hr18 `hrnet_w18`, hr48 `hrnet_w48` (checked by `ocrnet_hr_zoo_keys`).
- OCRHead `channels` 16, `ocr_channels` 8 (zoo 512 / 256); FCNHead channels 240 (= 16+32+64+128); 5 classes;
  SyncBN -> BN; weights re-drawn as above, **rounded to float16 and stored as float16** (mmseg runs them in
  float32): `ocrnet_hr.pth` is about 3.3 MB instead of 6.6 MB.
- Inputs: `input` `randn(1, 3, 64, 96)` (seed 20240601; branches 16x24 ... 2x3) and `input_odd`
  `randn(1, 3, 33, 49)` (seed 20240603; branches 9x13, 5x7, 3x4, 2x2), each with `logits`, `decode_out`
  (OCRHead), `aux_out` (stage-1 FCNHead), and `*_odd_one_step_fuse`: mmseg's model with each fuse `Upsample`
  replaced by `nn.Identity` (so `HRModule` resizes the branch once, bilinearly to the target size: the official
  HRNetV2 fuse that timm + `use_official_fuse` compute).
- The fuse: mmseg's `HRModule` upsamples a lower branch with `Upsample(scale_factor=2**k, mode='bilinear')` and
  then `resize`s it to the target branch's size. At sizes divisible by 32 the second resize is the identity and
  the result equals the one-step fuse bit for bit (asserted by the script at 64x96); at 33x49 they differ
  (`config['fuse']`: max abs logits difference 0.025 at logits std 0.20).
- `ocrnet_hr_v0_meta.json`: the `meta` of the same model in mmseg 0.x layout (config text of mmseg 0.30.0's
  `ocrnet_hr18s_512x1024_80k_cityscapes.py` with the same changes, `mmseg_version` '0.30.0', CLASSES, PALETTE);
  the tests pair it with `ocrnet_hr.pth`'s state dict. Both layouts were rebuilt from their config text and
  reloaded strictly by mmseg 1.2.2 (logits bit-identical).
- `ocrnet_hr_zoo_keys.json.gz`: `{tag: {config, keys: {name: shape}}}` of the full-size zoo models hr18s, hr18,
  hr48 (Cityscapes, 19 classes) and hr48 ADE20K (150 classes), built by mmseg on the meta device (no weights).

## Per-fixture table
"""


def write_readme(out_dir: Path):
    rows = []
    details = []
    for name in ALL_NAMES:
        p = out_dir / f'{name}_io.pt'
        if not p.exists():
            continue
        s = torch.load(p, weights_only=False)['config']
        dh = s['widths']['decode_head']
        w = '; '.join(', '.join(f'{k}={v}' for k, v in h.items()
                                if k not in ('type', 'in_index', 'num_classes', 'dropout_ratio',
                                             'align_corners'))
                      for h in dh)
        abl = '; '.join(f"{k.replace('decode_head.', '')} ({v['mode']}): "
                        f"{100 * v['rel_change']:.1f}%" for k, v in s['ablation'].items()) or '-'
        sz = s.get('file_sizes', {})
        rows.append(f"| `{name}` | {dh[-1]['type']} | {w} | {abl} | "
                    f"{s['f32_vs_f64_logits_max_abs']:.1e} | "
                    f"{sz.get(name + '.pth', 0) / 1e3:.0f} kB / {sz.get(name + '_io.pt', 0) / 1e3:.0f} kB |")
        ks = '\n'.join(f'    {k}: {" ".join(v)}' for k, v in s['key_structure'].items())
        details.append(f"### `{name}` ({s['segmentor']}, {s['checkpoint_layout']}, "
                       f"{s['state_dict_keys']} keys, weight seed {s['weight_seed']})\n\n"
                       f"Non-backbone state-dict keys (module: leaf[shape] ...):\n\n```\n{ks}\n```\n")
    table = ('| name | head | decode-head widths (in_channels, channels, ...) | attention effect: '
             '‖logits − logits without module‖ / ‖logits‖ | f32 vs f64 max abs | .pth / _io.pt |\n'
             '|---|---|---|---|---|---|\n' + '\n'.join(rows))
    backbone = ''
    for name in ALL_NAMES:
        p = out_dir / f'{name}_io.pt'
        if p.exists():
            s = torch.load(p, weights_only=False)['config']
            backbone = ('\n## Backbone keys (all fixtures)\n\n`backbone.` modules: '
                        + ', '.join(f'`{m}`' for m in s['backbone_modules'])
                        + '. Stem: `backbone.stem.{0,1,3,4,6,7}` (conv, BN, ReLU x3: convs at '
                        '0/3/6, BNs at 1/4/7); each stage `backbone.layerK.i.{conv1,bn1,conv2,bn2,'
                        'conv3,bn3}` plus `backbone.layerK.0.downsample.{0 (conv), 1 (BN)}`; '
                        'auxiliary head: `auxiliary_head.{convs.0.conv, convs.0.bn, conv_seg}`.\n')
            break
    psa = ''
    p = out_dir / 'psanet_io.pt'
    if p.exists():
        s = torch.load(p, weights_only=False)['config']['psanet']
        psa = ('\n## PSANet\n\n' + s['note'] + " Even-input ablation: "
               + '; '.join(f"{k}: {100 * v['rel_change']:.1f}%" for k, v in s['even_ablation'].items())
               + '.\n')
    total = sum(f.stat().st_size for f in out_dir.glob('*.p*'))
    text = (README_HEAD + '\n' + table + f'\n\nTotal size of the .pth/.pt files: {total / 1e6:.2f} MB.\n'
            + psa + backbone + '\n## Key structure per fixture\n\n' + '\n'.join(details))
    (out_dir / 'README.md').write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=str(DEFAULT_OUT))
    ap.add_argument('--only', default='', help='comma-separated subset of: ' + ','.join(ALL_NAMES))
    ap.add_argument('--mmseg0-src', default=str(DEFAULT_MMSEG0_SRC),
                    help='unpacked mmsegmentation 0.30.0 sdist (for the dnl_v0 config text)')
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(',') if n] or ALL_NAMES
    bad = [n for n in names if n not in ALL_NAMES]
    if bad:
        raise SystemExit(f'unknown fixture(s) {bad}; choose from {ALL_NAMES}')

    from mmseg.utils import register_all_modules
    register_all_modules()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    checks = []
    if 'psanet' in names:
        checks = check_psamask()
        patch_psamask()
    out = Path(args.out)
    for name in names:
        s = make_one(name, out, Path(args.mmseg0_src), checks)
        print(json.dumps(dict(name=name, ablation=s['ablation'], f32_vs_f64=s['f32_vs_f64_logits_max_abs'],
                              logits_std=s['logits_std'], sizes=s['file_sizes'])), flush=True)
        write_readme(out)


if __name__ == '__main__':
    sys.exit(main())
