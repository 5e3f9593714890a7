"""IResNet r18..r200 whose state dicts, shapes and forward match insightface arcface_torch exactly.

Layout (docs/formats.md §4): conv1/bn1/prelu stem at full resolution, four stages that each stride 2
(112 -> 7), pre-activation-style blocks (bn1 -> conv1 -> bn2 -> prelu -> conv2(stride) -> bn3, no
activation after the add), then bn2 -> flatten -> dropout -> fc -> features (BatchNorm1d with a weight
fixed at 1). Every BN is eps 1e-5 as in arcface_torch. Module names are the state-dict contract, so
they are not to be renamed.
"""


import torch
from timm.models import checkpoint_seq
from torch import nn

from distill.models.contract import FaceModelContract, check_in_chans, face_pretrained_cfg, fix_gamma
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


class IResNet(FaceModelContract, nn.Module):
    """arcface_torch IResNet. Input (B, 3, S, S) normalised (x/255-0.5)/0.5 RGB; output (B, embedding_size) raw.

    `embedding_size` is arcface_torch's `num_features` (every model of the registry says embedding_size; a
    student.pt that records `num_features` still loads: distill/compat.py); `input_size` generalises its fixed
    7x7 (112 input) flatten size to S/16 squared.
    `config` holds the keyword arguments of the registered `iresnet<depth>` that rebuild the model.
    """

    cpu_bf16 = True  # dense 3x3 convolutions: faster under bf16 autocast on a bf16 CPU (distill.utils.device)
    _head_names = ("dropout", "fc", "features")  # timm's contract (distill/models/contract.py): bn2 is the norm
    _final_norm_name = "bn2"

    def __init__(self, depth: int = 100, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                 num_classes: int = 0, in_chans: int = 3):
        super().__init__()
        check_in_chans(in_chans, f"iresnet{depth}")
        if depth not in LAYERS:
            raise ValueError(f"IResNet depth must be one of {sorted(LAYERS)}, got {depth}")
        self.depth = depth
        self.config = dict(embedding_size=embedding_size, dropout=dropout, input_size=input_size)
        if num_classes:
            self.config["num_classes"] = num_classes
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), LAYERS[depth], strict=True)):
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
        fix_gamma(self.features)
        # feature 0 is the stem (stride 1), then each layer halves the map
        info = [dict(num_chs=64, reduction=1, module="prelu")]
        info += [dict(num_chs=c, reduction=2 ** (i + 1), module=f"layer{i + 1}")
                 for i, c in enumerate((64, 128, 256, 512))]
        self._init_contract(num_classes, 512, embedding_size, info,
                            face_pretrained_cfg(input_size, side, "conv1", num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn1(self.conv1(x)))

    def _stages(self) -> list:
        return [(f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, 5)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^conv1|^bn1|^prelu", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """layer4's map, (B, 512, S/16, S/16), before bn2 (the final norm, applied by forward_head)."""
        x = self._stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = checkpoint_seq(layer, x)
            return x
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """bn2 -> flatten -> dropout -> fc -> BatchNorm: the embedding (forward_head, distill/models/contract.py)."""
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


# ------------------------------------------------------------------------------------------ registry
# arcface_torch's names (r18 .. r200) are aliases.

def _register_depth(depth: int, doc: str = "") -> object:
    """Register `iresnet<depth>` (alias `r<depth>`, with timm too): an IResNet of that depth."""

    def build(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0, num_classes: int = 0,
              in_chans: int = 3) -> IResNet:
        return IResNet(depth, embedding_size=embedding_size, input_size=input_size, dropout=dropout,
                       num_classes=num_classes, in_chans=in_chans)

    build.__name__ = build.__qualname__ = f"iresnet{depth}"
    build.__doc__ = doc or f"arcface_torch's IResNet-{depth}."
    return register_model(build, aliases=(f"r{depth}",), timm=dict(first_conv="conv1"))


iresnet18 = _register_depth(18)
iresnet34 = _register_depth(34)
iresnet50 = _register_depth(50)
iresnet100 = _register_depth(100, "The VarGFaceNet paper's teacher (arcface_torch r100: 65.2M parameters, 24.2 GFLOPs "
                                  "at 112x112).")
iresnet200 = _register_depth(200)
