"""MobileFaceNet as insightface arcface_torch builds it (`mbf`, `mbf_large`): its state-dict keys and shapes, so a
backbone.pth of arcface_torch loads strictly, and its constructor arguments (num_features, blocks, scale, fp16).

Layout at the defaults (scale 2, blocks (1, 4, 6, 2), 112x112 input; arcface_torch's "mobilefacenet-0.45G"):

    layers.0   3x3 conv stride 2, BN, PReLU (3 -> 64*scale)                           56x56
    layers.1   3x3 conv in 64 groups (blocks[0] == 1), or blocks[0] residual blocks
    layers.2   depthwise block stride 2 (expansion 128)  + layers.3: blocks[1] residual blocks    28x28
    layers.4   depthwise block stride 2 (-> 128*scale, expansion 256) + layers.5: blocks[2]        14x14
    layers.6   depthwise block stride 2 (expansion 512)  + layers.7: blocks[3] residual blocks      7x7
    conv_sep   1x1 conv, BN, PReLU (-> 512)
    features   GDC: 7x7 depthwise conv + BN, flatten, linear 512 -> embedding (no bias), BatchNorm1d

A depthwise block is 1x1 conv + BN + PReLU to its expansion width, a 3x3 depthwise conv + BN + PReLU, a 1x1
conv + BN back (linear bottleneck); a residual block adds its input. The expansion widths (128, 256, 512), the
64 groups of layers.1 and conv_sep's 512 do not follow `scale`, as in arcface_torch. Every BN is PyTorch's
default (eps 1e-5); the last BatchNorm1d keeps a trained scale (arcface_torch's IResNet fixes it; this does not).

Where this differs from arcface_torch, and why: `layers` is an nn.Sequential, not a ModuleList (the same state-dict
keys, and timm's features_only flattens it); `input_size` sizes the GDC kernel to the final map (S/16: 7 at 112),
so the model runs at 32 px for the quickstart-sized runs; `fp16` runs the layers under CUDA float16 autocast and
conv_sep on float32 as theirs does, and does nothing on the CPU (a run's precision is its `train.amp`).
`num_features` is arcface_torch's name for `embedding_size` (the registry's): either may be given.
"""


import torch
from timm.models import checkpoint_seq
from torch import nn

from distill.models.contract import FaceModelContract, check_in_chans, face_pretrained_cfg
from distill.models.registry import register_model
from distill.utils.errors import ConfigError


class ConvBNPReLU(nn.Module):
    """arcface_torch's ConvBlock: conv (no bias) -> BatchNorm2d -> PReLU, as `layers.0/1/2`."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvBN(nn.Module):
    """arcface_torch's LinearBlock: conv (no bias) -> BatchNorm2d, no activation (a linear bottleneck)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWiseBlock(nn.Module):
    """arcface_torch's DepthWise: 1x1 to `width` channels, 3x3 depthwise (carries the stride), 1x1 back to `cout`;
    with `residual` the input is added (stride 1, cin == cout)."""

    def __init__(self, cin: int, cout: int, width: int, stride: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBNPReLU(cin, width), ConvBNPReLU(width, width, 3, stride, 1, groups=width),
                                    ConvBN(width, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """arcface_torch's Residual: `count` residual depthwise blocks of `channels` (expansion `width`)."""

    def __init__(self, channels: int, count: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWiseBlock(channels, channels, width, 1, True) for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution (the MobileFaceNet paper's embedding head): a depthwise conv over the whole
    final map + BN, flatten, linear (no bias) to the embedding, BatchNorm1d."""

    def __init__(self, embedding_size: int, kernel: int):
        super().__init__()
        self.layers = nn.Sequential(ConvBN(512, 512, kernel, groups=512), nn.Flatten(1),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _final_side(input_size: int) -> int:
    """The final map's side: four stride-2 3x3 convs with padding 1, each giving ceil(n / 2) (112 -> 7)."""
    for _ in range(4):
        input_size = (input_size + 1) // 2
    return input_size


class MobileFaceNet(FaceModelContract, nn.Module):
    """arcface_torch's MobileFaceNet. Input (B, 3, S, S) normalised (x/255-0.5)/0.5 RGB; output (B, embedding_size)
    raw. `blocks`: residual blocks after the stem and after each stride-2 block (blocks[0] == 1: a grouped conv
    instead); `scale`: the width multiplier of the 64/128 trunk channels (1 for the quickstart-sized runs)."""

    _head_names = ("conv_sep", "features")  # timm's contract (distill/models/contract.py); no final norm

    def __init__(self, embedding_size: int = 512, blocks: tuple = (1, 4, 6, 2), scale: int = 2, fp16: bool = False,
                 input_size: int = 112, num_classes: int = 0, in_chans: int = 3):
        super().__init__()
        check_in_chans(in_chans, "MobileFaceNet")
        # ConfigError (a ValueError): a config's student.<key> / teacher.<key> gets one line, not a traceback
        if len(blocks) != 4 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks):
            raise ConfigError(f"MobileFaceNet: key 'blocks' must be 4 counts of at least 1 (mbf: [1, 4, 6, 2], "
                              f"mbf_large: [2, 8, 12, 4]), got {list(blocks)!r}")
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
            raise ConfigError(f"MobileFaceNet: key 'scale' must be a whole number >= 1 (mbf: 2, mbf_large: 4), "
                              f"got {scale!r}")
        self.fp16 = fp16
        self.config = dict(embedding_size=embedding_size, blocks=list(blocks), scale=scale, fp16=fp16,
                           input_size=input_size)
        if num_classes:
            self.config["num_classes"] = num_classes
        c1, c2 = 64 * scale, 128 * scale
        second = (ConvBNPReLU(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1 else ResidualStack(c1, blocks[0], 128))
        self.layers = nn.Sequential(
            ConvBNPReLU(3, c1, 3, 2, 1), second,
            DepthWiseBlock(c1, c1, 128, 2, False), ResidualStack(c1, blocks[1], 128),
            DepthWiseBlock(c1, c2, 256, 2, False), ResidualStack(c2, blocks[2], 256),
            DepthWiseBlock(c2, c2, 512, 2, False), ResidualStack(c2, blocks[3], 256),
        )
        side = _final_side(input_size)
        self.conv_sep = ConvBNPReLU(c2, 512)
        self.features = GDC(embedding_size, side)
        # feature 0 is the stem (layers.0-1, stride 2); each stage is a stride-2 block and its residual stack
        info = [dict(num_chs=c1, reduction=2, module="layers.1")]
        info += [dict(num_chs=c, reduction=2 ** (i + 2), module=f"layers.{2 * i + 3}")
                 for i, c in enumerate((c1, c2, c2))]
        self._init_contract(num_classes, c2, embedding_size, info,
                            face_pretrained_cfg(input_size, side, "layers.0.layers.0", num_classes))
        for m in self.modules():  # arcface_torch's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x))

    def _stages(self) -> list:
        """Each stage as one module (a view of `layers`), named by its last entry (the feature_info module)."""
        return [(f"layers.{j + 1}", self.layers[j:j + 2]) for j in (2, 4, 6)]

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's semantics (distill/models/contract.py); a stage here is two entries of `layers`, both pruned."""
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        for j in range(2 * max(take) + 2, len(self.layers)):
            self.layers[j] = nn.Identity()
        return take

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^layers\.[01]\.", blocks=r"^layers\.(\d+)" if coarse else r"^layers\.(\d+)\.layers\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """layers.7's map, (B, 128*scale, S/16, S/16): under CUDA float16 autocast with fp16, as arcface_torch."""
        if self.fp16 and x.is_cuda and not torch.jit.is_scripting():
            return self._layers_fp16(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.layers, x)
        return self.layers(x)

    @torch.jit.unused
    def _layers_fp16(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16):
            return checkpoint_seq(self.layers, x) if self.grad_checkpointing else self.layers(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """conv_sep (on float32 with fp16, as arcface_torch) -> GDC: the embedding (forward_head, contract.py)."""
        return self.features(self.conv_sep(x.float() if self.fp16 else x))


# ------------------------------------------------------------------------------------------ registry

def _embedding_size(embedding_size: int, num_features: int | None, name: str) -> int:
    """The embedding size from either spelling: arcface_torch's `num_features` wins over the default 512."""
    if num_features is None:
        return embedding_size
    if embedding_size not in (512, num_features):
        raise ConfigError(f"{name}: num_features (arcface_torch's name) and embedding_size are the same argument; "
                          f"got num_features={num_features} and embedding_size={embedding_size}: give one of them")
    return num_features


def _register(name: str, default_blocks: tuple, default_scale: int, doc: str):
    def build(embedding_size: int = 512, input_size: int = 112, num_features: int | None = None,
              blocks: tuple = default_blocks, scale: int = default_scale, fp16: bool = False, num_classes: int = 0,
              in_chans: int = 3) -> MobileFaceNet:
        return MobileFaceNet(_embedding_size(embedding_size, num_features, name), tuple(blocks), scale, fp16,
                             input_size=input_size, num_classes=num_classes, in_chans=in_chans)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return register_model(build, timm=dict(first_conv="layers.0.layers.0"))


mbf = _register("mbf", (1, 4, 6, 2), 2, "arcface_torch's mbf, MobileFaceNet-0.45G: 2.06M parameters, 0.45 GMACs at "
                                         "112x112 (blocks (1, 4, 6, 2), scale 2).")
mbf_large = _register("mbf_large", (2, 8, 12, 4), 4, "arcface_torch's mbf_large: 6.31M parameters, 1.85 GMACs at "
                                                      "112x112 (blocks (2, 8, 12, 4), scale 4).")
