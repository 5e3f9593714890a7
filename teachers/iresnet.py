"""IResNet r18..r200 whose state dicts, shapes and forward match insightface arcface_torch exactly.

Layout (docs/formats.md §4): conv1/bn1/prelu stem at full resolution, four stages that each stride 2
(112 -> 7), pre-activation-style blocks (bn1 -> conv1 -> bn2 -> prelu -> conv2(stride) -> bn3, no
activation after the add), then bn2 -> flatten -> dropout -> fc -> features (BatchNorm1d with a weight
fixed at 1). Every BN is eps 1e-5 as in arcface_torch. Module names are the state-dict contract, so
they are not to be renamed.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.models.registry import register_model

LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch IResNet. Input (B, 3, S, S) normalised (x/255-0.5)/0.5 RGB; output (B, embedding_size) raw.

    `embedding_size` is arcface_torch's `num_features` (renamed: every model of the registry says
    embedding_size); `input_size` generalises its fixed 7x7 (112 input) flatten size to S/16 squared.
    `config` holds the keyword arguments of the registered `iresnet<depth>` that rebuild the model.
    """

    cpu_bf16 = True  # dense 3x3 convolutions: faster under bf16 autocast on a bf16 CPU (distill.utils.device)

    def __init__(self, depth: int = 100, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112):
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"IResNet depth must be one of {sorted(LAYERS)}, got {depth}")
        self.depth = depth
        self.config = dict(embedding_size=embedding_size, dropout=dropout, input_size=input_size)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), LAYERS[depth])):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
            layer = [IBasicBlock(inplanes, planes, 2, downsample)]
            layer += [IBasicBlock(planes, planes, 1, None) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes
        side = input_size
        for _ in range(4):
            side = (side + 1) // 2
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


# ------------------------------------------------------------------------------------------ registry
# arcface_torch's names (r18 .. r200) are aliases.

@register_model(aliases=("r18",))
def iresnet18(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    return IResNet(18, embedding_size=embedding_size, input_size=input_size, dropout=dropout)


@register_model(aliases=("r34",))
def iresnet34(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    return IResNet(34, embedding_size=embedding_size, input_size=input_size, dropout=dropout)


@register_model(aliases=("r50",))
def iresnet50(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    return IResNet(50, embedding_size=embedding_size, input_size=input_size, dropout=dropout)


@register_model(aliases=("r100",))
def iresnet100(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """The VarGFaceNet paper's teacher (arcface_torch r100: 65.2M parameters, 24.2 GFLOPs at 112x112)."""
    return IResNet(100, embedding_size=embedding_size, input_size=input_size, dropout=dropout)


@register_model(aliases=("r200",))
def iresnet200(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    return IResNet(200, embedding_size=embedding_size, input_size=input_size, dropout=dropout)
