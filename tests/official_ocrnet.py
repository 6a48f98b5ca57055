"""TEST-ONLY transcription of NVIDIA's OCR / MscaleOCR heads and forwards, for equivalence tests.

Repository: NVIDIA/semantic-segmentation, commit 66464461b6074e3fc6926c3039ef2b503197944f
Files: network/ocrnet.py (OCR_block, OCRNet.forward, MscaleOCR._fwd / nscale_forward / two_scale_forward),
network/ocr_utils.py (SpatialGather_Module, ObjectAttentionBlock, SpatialOCR_Module), network/utils.py (BNReLU,
make_attn_head), network/mynn.py (Upsample, scale_as, ResizeX; commit 055ee5f5), network/hrnetv2.py (the branch
upsampling + concat at the end of HighResolutionNet.forward), utils/trnval_utils.py (eval_minibatch's flip loop),
config.py as in DeLightCMU/PSA@588b370d semantic-segmentation/config.py (MODEL.OCR.MID_CHANNELS 512, KEY_CHANNELS
256, SEGATTN_BOT_CH 256, MSCALE_INNER_3x3 True, MSCALE_DROPOUT False, MSCALE_LO_SCALE 0.5, ALIGN_CORNERS False,
OCR_ASPP False, MSCALE_OLDARCH False, BNFUNC BatchNorm2d).

The cfg reads are constructor arguments with those defaults; nothing else changed (module names, operation order),
so `MscaleOCRHeads().state_dict()` has NVIDIA's checkpoint keys `ocr.*` and `scale_attn.*` (after stripping
`module.`). The backbone is a callable x -> high_level_features (NVIDIA's `self.backbone(x)[2]`); `hrnetv2_concat`
builds that from four branches. Not part of lit_attn.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

ALIGN_CORNERS = False


def Upsample(x, size):  # noqa: N802  (NVIDIA's name)
    return nn.functional.interpolate(x, size=size, mode='bilinear', align_corners=ALIGN_CORNERS)


def scale_as(x, y):
    y_size = y.size(2), y.size(3)
    return torch.nn.functional.interpolate(x, size=y_size, mode='bilinear', align_corners=ALIGN_CORNERS)


def ResizeX(x, scale_factor):  # noqa: N802
    return torch.nn.functional.interpolate(x, scale_factor=scale_factor, mode='bilinear',
                                           align_corners=ALIGN_CORNERS, recompute_scale_factor=True)


def BNReLU(ch):  # noqa: N802
    return nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU())


def hrnetv2_concat(x):
    """The end of NVIDIA's HighResolutionNet.forward: branches 1-3 upsampled to branch 0, concatenated."""
    x0_h, x0_w = x[0].size(2), x[0].size(3)
    x1 = F.interpolate(x[1], size=(x0_h, x0_w), mode='bilinear', align_corners=ALIGN_CORNERS)
    x2 = F.interpolate(x[2], size=(x0_h, x0_w), mode='bilinear', align_corners=ALIGN_CORNERS)
    x3 = F.interpolate(x[3], size=(x0_h, x0_w), mode='bilinear', align_corners=ALIGN_CORNERS)
    return torch.cat([x[0], x1, x2, x3], 1)


class SpatialGather_Module(nn.Module):  # noqa: N801
    def __init__(self, cls_num=0, scale=1):
        super().__init__()
        self.cls_num = cls_num
        self.scale = scale

    def forward(self, feats, probs):
        batch_size, c, _, _ = probs.size(0), probs.size(1), probs.size(2), probs.size(3)
        probs = probs.view(batch_size, c, -1)
        feats = feats.view(batch_size, feats.size(1), -1)
        feats = feats.permute(0, 2, 1)  # batch x hw x c
        probs = F.softmax(self.scale * probs, dim=2)  # batch x k x hw
        ocr_context = torch.matmul(probs, feats)
        ocr_context = ocr_context.permute(0, 2, 1).unsqueeze(3)
        return ocr_context


class ObjectAttentionBlock(nn.Module):
    def __init__(self, in_channels, key_channels, scale=1):
        super().__init__()
        self.scale = scale
        self.in_channels = in_channels
        self.key_channels = key_channels
        self.pool = nn.MaxPool2d(kernel_size=(scale, scale))
        self.f_pixel = nn.Sequential(
            nn.Conv2d(self.in_channels, self.key_channels, kernel_size=1, stride=1, padding=0, bias=False),
            BNReLU(self.key_channels),
            nn.Conv2d(self.key_channels, self.key_channels, kernel_size=1, stride=1, padding=0, bias=False),
            BNReLU(self.key_channels),
        )
        self.f_object = nn.Sequential(
            nn.Conv2d(self.in_channels, self.key_channels, kernel_size=1, stride=1, padding=0, bias=False),
            BNReLU(self.key_channels),
            nn.Conv2d(self.key_channels, self.key_channels, kernel_size=1, stride=1, padding=0, bias=False),
            BNReLU(self.key_channels),
        )
        self.f_down = nn.Sequential(
            nn.Conv2d(self.in_channels, self.key_channels, kernel_size=1, stride=1, padding=0, bias=False),
            BNReLU(self.key_channels),
        )
        self.f_up = nn.Sequential(
            nn.Conv2d(self.key_channels, self.in_channels, kernel_size=1, stride=1, padding=0, bias=False),
            BNReLU(self.in_channels),
        )

    def forward(self, x, proxy):
        batch_size, h, w = x.size(0), x.size(2), x.size(3)
        if self.scale > 1:
            x = self.pool(x)
        query = self.f_pixel(x).view(batch_size, self.key_channels, -1)
        query = query.permute(0, 2, 1)
        key = self.f_object(proxy).view(batch_size, self.key_channels, -1)
        value = self.f_down(proxy).view(batch_size, self.key_channels, -1)
        value = value.permute(0, 2, 1)
        sim_map = torch.matmul(query, key)
        sim_map = (self.key_channels ** -.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value)
        context = context.permute(0, 2, 1).contiguous()
        context = context.view(batch_size, self.key_channels, *x.size()[2:])
        context = self.f_up(context)
        if self.scale > 1:
            context = F.interpolate(input=context, size=(h, w), mode='bilinear', align_corners=ALIGN_CORNERS)
        return context


class SpatialOCR_Module(nn.Module):  # noqa: N801  (OCR_ASPP False)
    def __init__(self, in_channels, key_channels, out_channels, scale=1, dropout=0.1):
        super().__init__()
        self.object_context_block = ObjectAttentionBlock(in_channels, key_channels, scale)
        _in_channels = 2 * in_channels
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(_in_channels, out_channels, kernel_size=1, padding=0, bias=False),
            BNReLU(out_channels),
            nn.Dropout2d(dropout)
        )

    def forward(self, feats, proxy_feats):
        context = self.object_context_block(feats, proxy_feats)
        output = self.conv_bn_dropout(torch.cat([context, feats], 1))
        return output


class OCR_block(nn.Module):  # noqa: N801  (INIT_DECODER False: PyTorch-default init)
    def __init__(self, high_level_ch, num_classes, ocr_mid_channels=512, ocr_key_channels=256):
        super().__init__()
        self.conv3x3_ocr = nn.Sequential(
            nn.Conv2d(high_level_ch, ocr_mid_channels, kernel_size=3, stride=1, padding=1),
            BNReLU(ocr_mid_channels),
        )
        self.ocr_gather_head = SpatialGather_Module(num_classes)
        self.ocr_distri_head = SpatialOCR_Module(in_channels=ocr_mid_channels, key_channels=ocr_key_channels,
                                                 out_channels=ocr_mid_channels, scale=1, dropout=0.05)
        self.cls_head = nn.Conv2d(ocr_mid_channels, num_classes, kernel_size=1, stride=1, padding=0, bias=True)
        self.aux_head = nn.Sequential(
            nn.Conv2d(high_level_ch, high_level_ch, kernel_size=1, stride=1, padding=0),
            BNReLU(high_level_ch),
            nn.Conv2d(high_level_ch, num_classes, kernel_size=1, stride=1, padding=0, bias=True)
        )

    def forward(self, high_level_features):
        feats = self.conv3x3_ocr(high_level_features)
        aux_out = self.aux_head(high_level_features)
        context = self.ocr_gather_head(feats, aux_out)
        ocr_feats = self.ocr_distri_head(feats, context)
        cls_out = self.cls_head(ocr_feats)
        return cls_out, aux_out, ocr_feats


def make_attn_head(in_ch, out_ch, bot_ch=256, inner_3x3=True, dropout=False):
    od = OrderedDict([('conv0', nn.Conv2d(in_ch, bot_ch, kernel_size=3, padding=1, bias=False)),
                      ('bn0', nn.BatchNorm2d(bot_ch)),
                      ('re0', nn.ReLU(inplace=True))])
    if inner_3x3:
        od['conv1'] = nn.Conv2d(bot_ch, bot_ch, kernel_size=3, padding=1, bias=False)
        od['bn1'] = nn.BatchNorm2d(bot_ch)
        od['re1'] = nn.ReLU(inplace=True)
    if dropout:
        od['drop'] = nn.Dropout(0.5)
    od['conv2'] = nn.Conv2d(bot_ch, out_ch, kernel_size=1, bias=False)
    od['sig'] = nn.Sigmoid()
    return nn.Sequential(od)


class MscaleOCRHeads(nn.Module):
    """MscaleOCR's modules without the backbone: `ocr` (OCR_block) and `scale_attn` (make_attn_head on the OCR
    features); OCRNet's are `ocr` alone."""

    def __init__(self, high_level_ch, num_classes, mid_channels=512, key_channels=256, bot_ch=256):
        super().__init__()
        self.ocr = OCR_block(high_level_ch, num_classes, mid_channels, key_channels)
        self.scale_attn = make_attn_head(in_ch=mid_channels, out_ch=1, bot_ch=bot_ch)


def ocrnet_forward(heads, backbone, x):
    """OCRNet.forward's outputs: (cls_out, aux_out) resized to x (eval: 'pred' = cls_out)."""
    high_level_features = backbone(x)
    cls_out, aux_out, _ = heads.ocr(high_level_features)
    aux_out = scale_as(aux_out, x)
    cls_out = scale_as(cls_out, x)
    return cls_out, aux_out


def mscale_fwd(heads, backbone, x):
    x_size = x.size()[2:]
    high_level_features = backbone(x)
    cls_out, aux_out, ocr_mid_feats = heads.ocr(high_level_features)
    attn = heads.scale_attn(ocr_mid_feats)
    aux_out = Upsample(aux_out, x_size)
    cls_out = Upsample(cls_out, x_size)
    attn = Upsample(attn, x_size)
    return {'cls_out': cls_out, 'aux_out': aux_out, 'logit_attn': attn}


def nscale_forward(heads, backbone, x_1x, scales):
    """MscaleOCR.nscale_forward: (pred, aux) (eval mode returns 'pred'; aux enters its training loss)."""
    assert 1.0 in scales, 'expected 1.0 to be the target scale'
    scales = sorted(scales, reverse=True)
    pred = None
    aux = None
    for s in scales:
        x = ResizeX(x_1x, s)
        outs = mscale_fwd(heads, backbone, x)
        cls_out = outs['cls_out']
        attn_out = outs['logit_attn']
        aux_out = outs['aux_out']
        if pred is None:
            pred = cls_out
            aux = aux_out
        elif s >= 1.0:
            # downscale previous
            pred = scale_as(pred, cls_out)
            pred = attn_out * cls_out + (1 - attn_out) * pred
            aux = scale_as(aux, cls_out)
            aux = attn_out * aux_out + (1 - attn_out) * aux
        else:
            # s < 1.0: upscale current
            cls_out = attn_out * cls_out
            aux_out = attn_out * aux_out
            cls_out = scale_as(cls_out, pred)
            aux_out = scale_as(aux_out, pred)
            attn_out = scale_as(attn_out, pred)
            pred = cls_out + (1 - attn_out) * pred
            aux = aux_out + (1 - attn_out) * aux
    return pred, aux


def two_scale_forward(heads, backbone, x_1x, lo_scale=0.5):
    """MscaleOCR.two_scale_forward: {'pred': joint_pred, 'aux': joint_aux (training loss, OCR_ALPHA), 'pred_05x',
    'pred_10x', 'attn_05x' (eval outputs), 'scaled_pred_05x' (SUPERVISED_MSCALE_WT's loss_lo input)}."""
    x_lo = ResizeX(x_1x, lo_scale)
    lo_outs = mscale_fwd(heads, backbone, x_lo)
    pred_05x = lo_outs['cls_out']
    p_lo = pred_05x
    aux_lo = lo_outs['aux_out']
    logit_attn = lo_outs['logit_attn']
    attn_05x = logit_attn

    hi_outs = mscale_fwd(heads, backbone, x_1x)
    pred_10x = hi_outs['cls_out']
    p_1x = pred_10x
    aux_1x = hi_outs['aux_out']

    p_lo = logit_attn * p_lo
    aux_lo = logit_attn * aux_lo
    p_lo = scale_as(p_lo, p_1x)
    aux_lo = scale_as(aux_lo, p_1x)
    logit_attn = scale_as(logit_attn, p_1x)

    joint_pred = p_lo + (1 - logit_attn) * p_1x
    joint_aux = aux_lo + (1 - logit_attn) * aux_1x
    return {'pred': joint_pred, 'aux': joint_aux, 'pred_05x': pred_05x, 'pred_10x': pred_10x,
            'attn_05x': attn_05x, 'scaled_pred_05x': scale_as(pred_05x, p_1x)}


def flip_tensor(x, dim):
    dim = x.dim() + dim if dim < 0 else dim
    return x[tuple(slice(None, None) if i != dim else torch.arange(x.size(i) - 1, -1, -1).long()
                   for i in range(x.dim()))]


def eval_minibatch_output(net, images, do_flip):
    """eval_minibatch's output logits at default_scale 1.0 without AVGPOOL multi-scale: `net(images)` the model's
    'pred', with do_flip the mean of the flipped image's (flipped back) and the image's, flipped first."""
    flips = [1, 0] if do_flip else [0]
    scales = [1.0]
    output = 0.0
    with torch.no_grad():
        for flip in flips:
            for _scale in scales:
                inputs = flip_tensor(images, 3) if flip == 1 else images
                _pred = net(inputs)
                if flip == 1:
                    output = output + flip_tensor(_pred, 3)
                else:
                    output = output + _pred
    return output / len(scales) / len(flips)
