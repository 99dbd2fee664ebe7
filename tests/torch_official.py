"""A PyTorch re-statement of the official DOLG model and its multi-scale extractor.

Same module names, state_dict order and shapes as the authors' released code
(the listings are in tests/data/official_dolg_*_state_dict.tsv), same forward.
Used only to test the converter and the exports (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64, eps=1e-5)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, stride=2, padding=1)


class Bottleneck(nn.Module):
    def __init__(self, w_in, w_out, stride, w_b):
        super().__init__()
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:  # registered before `f`, as in pycls
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out, eps=1e-5)
        self.f = nn.Module()
        self.f.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.f.a_bn = nn.BatchNorm2d(w_b, eps=1e-5)
        self.f.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)  # stride on the 3x3
        self.f.b_bn = nn.BatchNorm2d(w_b, eps=1e-5)
        self.f.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.f.c_bn = nn.BatchNorm2d(w_out, eps=1e-5)

    def forward(self, x):
        f = self.f
        y = F.relu(f.a_bn(f.a(x)))
        y = F.relu(f.b_bn(f.b(y)))
        y = f.c_bn(f.c(y))
        shortcut = self.bn(self.proj(x)) if self.proj_block else x
        return F.relu(shortcut + y)


class ResNet(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.stem = Stem()
        w_in = 64
        for s, (n, w_b, stride) in enumerate(zip(STAGE_BLOCKS[depth], (64, 128, 256, 512), (1, 2, 2, 2)), start=1):
            stage = nn.Module()
            for b in range(1, n + 1):
                stage.add_module(f"b{b}", Bottleneck(w_in, 4 * w_b, stride if b == 1 else 1, w_b))
                w_in = 4 * w_b
            self.add_module(f"s{s}", stage)

    def forward(self, x):
        x = self.stem(x)
        for s in ("s1", "s2"):
            for block in getattr(self, s).children():
                x = block(x)
        for block in self.s3.children():
            x = block(x)
        res4 = x
        for block in self.s4.children():
            x = block(x)
        return res4, x


class ASPP(nn.Module):
    def __init__(self, c_in=1024, c=512, c_out=1024, rates=(6, 12, 18)):
        super().__init__()
        self.aspp = nn.ModuleList(
            [nn.Conv2d(c_in, c, 1)] + [nn.Conv2d(c_in, c, 3, padding=r, dilation=r) for r in rates]
        )
        self.im_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c, 1), nn.ReLU())
        self.conv_after = nn.Sequential(nn.Conv2d(c * (len(rates) + 2), c_out, 1), nn.ReLU())

    def forward(self, x):
        h, w = x.shape[2:]
        pooled = F.interpolate(self.im_pool(x), size=(h, w), mode="bilinear", align_corners=False)
        return self.conv_after(torch.cat([pooled] + [m(x) for m in self.aspp], dim=1))


class SpatialAttention2d(nn.Module):
    def __init__(self, with_ma):
        super().__init__()
        if with_ma:
            self.aspp = ASPP()
        self.with_ma = with_ma
        self.conv1 = nn.Conv2d(1024, 1024, 1)
        self.bn = nn.BatchNorm2d(1024, eps=1e-5)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(1024, 1, 1)
        self.softplus = nn.Softplus(beta=1, threshold=20)

    def forward(self, x):
        if self.with_ma:
            x = self.aspp(x)
        x = self.bn(self.conv1(x))
        feature = F.normalize(x, p=2, dim=1)
        att = self.softplus(self.conv2(self.act1(x)))
        return att * feature, att


class GeM(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * 3)
        self.eps = 1e-6

    def forward(self, x):
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), x.shape[-2:]).pow(1.0 / self.p)


class MarginHead(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, 512))
        self.register_buffer("t", torch.zeros(1))


class OfficialDOLG(nn.Module):
    def __init__(self, depth=50, with_ma=True, num_classes=81313):
        super().__init__()
        self.pool_l = nn.AdaptiveAvgPool2d(1)
        self.pool_g = GeM()
        self.fc_t = nn.Linear(2048, 1024)
        self.fc = nn.Linear(2048, 512)
        self.globalmodel = ResNet(depth)
        self.localmodel = SpatialAttention2d(with_ma)
        self.desc_cls = MarginHead(num_classes)

    def forward(self, x):
        """Returns (descriptor, res4, res5); the descriptor is not normalised, as officially."""
        res4, res5 = self.globalmodel(x)
        fl, _ = self.localmodel(res4)
        fg = self.fc_t(self.pool_g(res5).flatten(1))
        b, c, h, w = fl.shape
        dot = torch.bmm(fg.unsqueeze(1), fl.flatten(2))  # (B, 1, HW)
        proj = torch.bmm(fg.unsqueeze(2), dot).view(b, c, h, w) / (fg.norm(p=2, dim=1) ** 2).view(-1, 1, 1, 1)
        orth = self.pool_l(fl - proj).flatten(1)
        return self.fc(torch.cat([fg, orth], dim=1)), res4, res5


def randomise_(model: OfficialDOLG, seed: int = 0) -> OfficialDOLG:
    """Random weights with non-trivial BN statistics that keep activations in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.normal_(0, (2.0 / fan_out) ** 0.5, generator=g)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1, generator=g)
            elif isinstance(module, nn.BatchNorm2d):
                small = name.endswith("c_bn")
                module.weight.uniform_(0.1 if small else 0.5, 0.3 if small else 1.5, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
                module.running_mean.normal_(0, 0.2, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
                module.num_batches_tracked.fill_(1000)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0, module.in_features**-0.5, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
        model.pool_g.p.fill_(2.6)
        model.desc_cls.weight.normal_(0, 0.05, generator=g)
        model.desc_cls.t.fill_(0.25)
    return model.eval()


def official_input(images_rgb_0_255):
    """The official evaluation's preprocessing of RGB [0,255] NHWC numpy -> NCHW torch."""
    x = torch.from_numpy(images_rgb_0_255[..., ::-1].copy()) / 255.0  # BGR, as OpenCV reads it
    mean = torch.tensor([0.406, 0.456, 0.485])
    std = torch.tensor([0.225, 0.224, 0.229])
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def official_scaled_size(side: int, scale: float) -> int:
    """The authors' extractor's size for one side: Python's ``round`` (half to even) of a float64 product.

    Written out here, not imported from dolg_tf, so the tests that use it check
    the graph against an independent computation. A side that rounds to 0
    (which the authors' code would hand to OpenCV and fail on) becomes 1.
    """
    return max(1, int(round(float(side) * float(scale))))


def official_multiscale(module: OfficialDOLG, images_rgb_0_255, scales) -> np.ndarray:
    """The authors' multi-scale extraction of RGB [0,255] NHWC numpy images (one size per call).

    For each scale: resize the decoded pixels to ``round(h * s) x round(w * s)``
    (bilinear, half-pixel centres, no antialias: OpenCV's INTER_LINEAR), apply
    the official preprocessing, run the model, L2-normalise; then average the
    per-scale descriptors and L2-normalise again.
    """
    import numpy as np

    h, w = images_rgb_0_255.shape[1:3]
    total = 0
    for s in scales:
        x = torch.from_numpy(np.ascontiguousarray(images_rgb_0_255, dtype=np.float32)).permute(0, 3, 1, 2)
        size = (official_scaled_size(h, s), official_scaled_size(w, s))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = official_input(x.permute(0, 2, 3, 1).numpy())
        with torch.no_grad():
            d = module(x)[0].double().numpy()
        total = total + d / np.linalg.norm(d, axis=1, keepdims=True)
    return (total / np.linalg.norm(total, axis=1, keepdims=True)).astype(np.float32)
