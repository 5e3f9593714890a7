"""VarGFaceNet (Yan et al., arXiv 1910.04985): the lightweight student, every ablation knob an argument.

Structure at the defaults (multiplier 1.25, S = 8 channels per group, 112x112 input):

    stem       3x3 conv stride 1 (3 -> 40) + BN + act          112x112   keeps the full-resolution detail
               VarG block, stride 2 (40 -> 40)                   56x56
    stage 2    branch-merge block stride 2 + 2 blocks (-> 80)    28x28
    stage 3    branch-merge block stride 2 + 6 blocks (-> 160)   14x14
    stage 4    branch-merge block stride 2 + 3 blocks (-> 320)    7x7
    embedding  1x1 320 -> 1024, 7x7 variable-group conv (1024/8 groups), 1x1 -> 512, FC 512, BatchNorm1d

Modules: `stem`, `stages`, `embed` (the embedding block), `fc` and `embedding_norm` (the BatchNorm1d that ends
the embedding). The `head` argument keeps the paper's name for the stem's design ("head setting"); the margin
classifier the engine calls its head is not part of the model. State dicts with the legacy module names
(`head.*`, `features.*`) still load (distill/compat.py).

A "variable group" convolution fixes the channels per group (S) instead of the number of groups, so the
compute per group is constant across the network; S = 1 is a depthwise convolution (the paper's
MobileNet-style baseline). Its output has `factor` times its input channels (2 in the stages, 1 in the
stem), then a pointwise 1x1 conv maps to the block's output width.

BatchNorm uses eps 2e-5 and PyTorch momentum 0.1, which is MXNet's momentum 0.9 (the two frameworks
define the running-average weight the other way round). Blocks whose shortcut is the identity build no
shortcut module, so every parameter is used and DDP needs no `find_unused_parameters`.
"""


import math

import torch
from timm.models import checkpoint_seq
from torch import nn

from distill.compat import register_legacy_keys
from distill.models.contract import FaceModelContract, check_in_chans, face_pretrained_cfg, fix_gamma
from distill.models.registry import register_model

BN_EPS = 2e-5
BN_MOMENTUM = 0.1  # == MXNet momentum 0.9


def _bn2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _act(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"act must be 'prelu' or 'relu', got {kind!r}")


def _groups(channels: int, group_size: int) -> int:
    if channels % group_size:
        raise ValueError(
            f"{channels} channels cannot be split into groups of {group_size} channels "
            f"(group_size S must divide every block's width; try S=1, 8 or a multiplier giving multiples of S)"
        )
    return channels // group_size


class SEBlock(nn.Module):
    """Squeeze-and-excitation: global pool -> 1x1 (C/ratio) -> act -> 1x1 (C) -> sigmoid gate."""

    def __init__(self, channels: int, ratio: int, act: str):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // ratio, 1)
        self.act = _act(act, channels // ratio)
        self.fc2 = nn.Conv2d(channels // ratio, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(w))))


class VarGSeparable(nn.Module):
    """Variable-group 3x3 conv (in -> in*factor, S channels per group) + BN + act, then pointwise 1x1 + BN [+ act]."""

    def __init__(self, cin: int, cout: int, stride: int, factor: int, group_size: int, act: str, act_out: bool):
        super().__init__()
        mid = cin * factor
        self.group_conv = nn.Conv2d(cin, mid, 3, stride, 1, groups=_groups(cin, group_size), bias=False)
        self.bn1 = _bn2d(mid)
        self.act1 = _act(act, mid)
        self.pointwise = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = _bn2d(cout)
        self.act2 = _act(act, cout) if act_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.group_conv(x)))
        return self.act2(self.bn2(self.pointwise(x)))


class VarGBlock(nn.Module):
    """Normal block: two separable convs (the first carries the stride), optional SE, shortcut, act.

    The shortcut is the identity when shape is kept; otherwise a separable conv (no module otherwise).
    """

    def __init__(self, cin, cout, stride, factor, group_size, act, se_ratio):
        super().__init__()
        self.sep1 = VarGSeparable(cin, cout, stride, factor, group_size, act, act_out=True)
        self.sep2 = VarGSeparable(cout, cout, 1, factor, group_size, act, act_out=False)
        self.se = SEBlock(cout, se_ratio, act) if se_ratio else None
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = VarGSeparable(cin, cout, stride, factor, group_size, act, act_out=False)
        self.act = _act(act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sep2(self.sep1(x))
        if self.se is not None:
            out = self.se(out)
        return self.act(out + (x if self.shortcut is None else self.shortcut(x)))


class VarGBranchMergeBlock(nn.Module):
    """Down-sampling block: two parallel separable convs summed (more information through the stride),
    act, a second separable conv, plus a separable-conv shortcut, act. No SE, as in the reference."""

    def __init__(self, cin, cout, stride, factor, group_size, act):
        super().__init__()
        self.branch1 = VarGSeparable(cin, cout, stride, factor, group_size, act, act_out=False)
        self.branch2 = VarGSeparable(cin, cout, stride, factor, group_size, act, act_out=False)
        self.act1 = _act(act, cout)
        self.sep2 = VarGSeparable(cout, cout, 1, factor, group_size, act, act_out=False)
        self.shortcut = VarGSeparable(cin, cout, stride, factor, group_size, act, act_out=False)
        self.act2 = _act(act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.branch1(x) + self.branch2(x))
        return self.act2(self.sep2(out) + self.shortcut(x))


def _downsampled(size: int, times: int) -> int:
    """Spatial size after `times` stride-2 3x3 convs with padding 1 (each gives ceil(n / 2))."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


class VarGFaceNet(FaceModelContract, nn.Module):
    """VarGFaceNet student. Input: (B, 3, input_size, input_size) normalised (x/255-0.5)/0.5 RGB.
    Output: (B, embedding_size) raw (not L2-normalised) embeddings.

    Args:
        embedding_size: dimension of the face embedding (paper: 512).
        group_size: channels per group S of every variable-group conv (paper 8; 1 = depthwise).
        se: squeeze-and-excitation in the normal blocks (ratio `se_ratio`).
        act: 'prelu' (paper) or 'relu'.
        head: the stem's design, in the paper's words its "head": 'vargfacenet' (3x3 stride-1 conv + a stride-2
            block: keeps 112x112 detail) or 'vargnet' (VarGNet's: stride-2 conv + stride-2 block, 4x cheaper,
            loses detail).
        embedding: 'vargfacenet' (1x1 -> last_channels, 7x7 variable-group conv, 1x1 -> last_channels/2,
            FC, BN1d) or 'gap' (VarGNet's: 1x1 -> last_channels, global average pool, FC, BN1d).
        multiplier: width multiplier of filters [32, 64, 128, 256] (paper 1.25).
        last_channels: width of the embedding block's expansion (paper 1024).
        units: blocks per stage 2, 3, 4 (paper [3, 7, 4]).
        input_size: square input side; the embedding conv kernel is the final map size (112 -> 7).
        dropout: dropout before the FC (0 in the paper's distillation setting).
        num_classes: a classifier after the embedding (timm's contract: distill/models/contract.py); 0, the
            default, has none and `forward` gives the embedding.
    """

    _head_names = ("embed", "fc", "embedding_norm")

    def __init__(
        self,
        embedding_size: int = 512,
        group_size: int = 8,
        se: bool = True,
        se_ratio: int = 4,
        act: str = "prelu",
        head: str = "vargfacenet",
        embedding: str = "vargfacenet",
        multiplier: float = 1.25,
        last_channels: int = 1024,
        units: tuple = (3, 7, 4),
        input_size: int = 112,
        dropout: float = 0.0,
        factor: int = 2,
        num_classes: int = 0,
        in_chans: int = 3,
    ):
        super().__init__()
        check_in_chans(in_chans, "VarGFaceNet")
        if head not in ("vargfacenet", "vargnet"):
            raise ValueError(f"head must be 'vargfacenet' or 'vargnet', got {head!r}")
        if embedding not in ("vargfacenet", "gap"):
            raise ValueError(f"embedding must be 'vargfacenet' or 'gap', got {embedding!r}")
        if len(units) != 3:
            raise ValueError(f"units must list the blocks of 3 stages, got {units!r}")
        self.config = dict(
            embedding_size=embedding_size, group_size=group_size, se=se, se_ratio=se_ratio, act=act,
            head=head, embedding=embedding, multiplier=multiplier, last_channels=last_channels,
            units=list(units), input_size=input_size, dropout=dropout, factor=factor,
        )
        if num_classes:
            self.config["num_classes"] = num_classes
        widths = [int(f * multiplier) for f in (32, 64, 128, 256)]
        se_ratio = se_ratio if se else 0

        stem_stride = 1 if head == "vargfacenet" else 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False),
            _bn2d(widths[0]),
            _act(act, widths[0]),
            VarGBlock(widths[0], widths[0], 2, 1, group_size, act, se_ratio),
        )
        stages = []
        for i, n in enumerate(units):
            blocks = [VarGBranchMergeBlock(widths[i], widths[i + 1], 2, factor, group_size, act)]
            blocks += [VarGBlock(widths[i + 1], widths[i + 1], 1, factor, group_size, act, se_ratio)
                       for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.feature_size = _downsampled(input_size, 4 + (stem_stride == 2))
        c = widths[3]
        layers = [nn.Conv2d(c, last_channels, 1, bias=False), _bn2d(last_channels), _act(act, last_channels)]
        if embedding == "vargfacenet":
            k = self.feature_size
            layers += [
                nn.Conv2d(last_channels, last_channels, k, 1, 0, groups=_groups(last_channels, group_size), bias=False),
                _bn2d(last_channels),
                nn.Conv2d(last_channels, last_channels // 2, 1, bias=False),
                _bn2d(last_channels // 2),
                _act(act, last_channels // 2),
            ]
            fc_in = last_channels // 2
        else:
            layers += [nn.AdaptiveAvgPool2d(1)]
            fc_in = last_channels
        self.embed = nn.Sequential(*layers, nn.Flatten(1), nn.Dropout(dropout))
        self.fc = nn.Linear(fc_in, embedding_size)
        # MXNet fix_gamma=True / arcface_torch: the last BN scales nothing, it only centres and whitens.
        self.embedding_norm = nn.BatchNorm1d(embedding_size, eps=BN_EPS, momentum=BN_MOMENTUM)
        fix_gamma(self.embedding_norm)
        # feature 0 is the stem's output (stride 2 with the paper's stride-1 first conv), then each stage's
        r = 2 * stem_stride
        info = [dict(num_chs=widths[0], reduction=r, module="stem.3")]
        info += [dict(num_chs=widths[i + 1], reduction=r * 2 ** (i + 1), module=f"stages.{i}") for i in range(3)]
        self._init_contract(num_classes, widths[3], embedding_size, info,
                            face_pretrained_cfg(input_size, self.feature_size, "stem.0", num_classes))
        self._init_weights()
        register_legacy_keys(self)  # a plain load_state_dict of a state dict with the legacy key names

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _stages(self) -> list:
        return [(f"stages.{i}", stage) for i, stage in enumerate(self.stages)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map: (B, num_features, S/16, S/16) with the paper's stem."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding block -> fc -> BatchNorm: the embedding (forward_head, distill/models/contract.py)."""
        return self.embedding_norm(self.fc(self.embed(x)))


# ------------------------------------------------------------------------------------------ registry

@register_model(builds=VarGFaceNet, timm=dict(first_conv="stem.0"))
def vargfacenet(**kwargs) -> VarGFaceNet:
    """VarGFaceNet as in the paper: S=8, SE, PReLU, stride-1 stem, 1024-channel embedding block."""
    return VarGFaceNet(**kwargs)


@register_model(builds=VarGFaceNet, timm=dict(first_conv="stem.0"))
def vargfacenet_depthwise(group_size: int = 1, **kwargs) -> VarGFaceNet:
    """The paper's MobileNet-style baseline: VarGFaceNet with depthwise convolutions (S=1)."""
    return VarGFaceNet(group_size=group_size, **kwargs)
