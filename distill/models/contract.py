"""timm's model contract for the face models (VarGFaceNet, IResNet): what timm's tooling expects of a model.

A face model here is `forward_features(x)` (the last feature map) followed by `forward_head(x)` (the embedding
block, fc and BatchNorm: the embedding; a classifier after it when built with `num_classes > 0`), so
`forward(x) == forward_head(forward_features(x))` is the embedding. On top of that a model of this family
has:

- `pretrained_cfg` / `default_cfg` with the face conventions: `input_size (3, S, S)` at the built size,
  `fixed_input_size: True` (the embedding block's kernel or the fc is sized for it), `mean = std = (0.5,) * 3`
  (insightface's (x/255 - 0.5)/0.5), `pool_size`, `first_conv`, `classifier`, `num_classes`;
- `num_classes`, `num_features` (channels of `forward_features`' map), `head_hidden_size` (the embedding size),
  `reset_classifier`, `get_classifier`, `set_grad_checkpointing`, `group_matcher`;
- `feature_info` (one entry per stage: channels, reduction, module) and `forward_intermediates` /
  `prune_intermediate_layers` in timm's semantics (indices: the last n stages for an int, those listed for a
  sequence; `stop_early`; `norm` applies the model's final norm where it has one; NCHW only), so
  `timm.create_model(name, features_only=True)` works with timm's FeatureListNet and `feature_cls='getter'`.

The classifier is `nn.Identity` when `num_classes == 0` (the default), so the state dict keys are unchanged
(arcface_torch's backbone.pth still loads strictly).

No postponed annotations here: FX copies `forward`'s annotations into its generated code as written, and
TorchScript cannot read them as strings."""


import torch
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

FACE_MEAN = FACE_STD = (0.5, 0.5, 0.5)  # insightface's normalisation: (x / 255 - 0.5) / 0.5
# timm's global_pool: the embedding block is a face model's pooling; '' leaves it out (forward gives the map)
POOLED = "embedding"


def face_pretrained_cfg(input_size: int, pool_size: int, first_conv: str, num_classes: int = 0) -> dict:
    """The pretrained_cfg of a face model built for `input_size` (no weights are published: no url/hf_hub_id)."""
    return {"input_size": (3, input_size, input_size), "fixed_input_size": True, "mean": FACE_MEAN,
            "std": FACE_STD, "pool_size": (pool_size, pool_size), "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "first_conv": first_conv, "classifier": "classifier",
            "num_classes": num_classes, "license": "see the facedistill repository"}


def fix_gamma(bn: nn.Module) -> None:
    """MXNet's fix_gamma=True / arcface_torch's frozen last BatchNorm: its scale is 1 and never trained. Held as
    a buffer, not a parameter without gradient (the state dict key `weight` is the same), so every parameter
    of the model trains, as timm's tooling and tests expect."""
    weight = torch.ones_like(bn.weight.detach())
    del bn.weight
    bn.register_buffer("weight", weight)


def check_in_chans(in_chans: int, name: str) -> None:
    if in_chans != 3:
        raise ValueError(f"{name}: face models take RGB images (in_chans=3), got in_chans={in_chans}")


class FaceModelContract:
    """The shared half of the contract, for a model that defines `_stem(x)` (feature 0), `_stages()` (the
    stages after the stem in order, each `(module name, module)`), `_final_norm_name` (the attribute of a norm
    that belongs to the last stage's map, if any), `_head_names` (the modules of the embedding block),
    `forward_features(x)` (the last map) and `_embed(map)` (embedding block, fc, BN: the embedding), and calls
    `_init_contract`. `forward` is `forward_head(forward_features(x))`."""

    _head_names: tuple = ()
    _final_norm_name: str = ""

    output_fmt = "NCHW"

    def _init_contract(self, num_classes: int, num_features: int, embedding_size: int, feature_info: list,
                       pretrained_cfg: dict) -> None:
        self.num_classes = int(num_classes)
        self.global_pool = POOLED
        self.in_chans = 3
        self.num_features = num_features
        self.head_hidden_size = embedding_size
        self.classifier = nn.Linear(embedding_size, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = feature_info
        self.grad_checkpointing = False
        self.pretrained_cfg = pretrained_cfg
        self.default_cfg = pretrained_cfg

    # ---------------------------------------------------------------------------------------- classifier
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (randomly initialised) classifier of `num_classes` after the embedding; 0 removes it.
        `global_pool`: the embedding block is the model's pooling; '' leaves it (and fc, BN, classifier) out, so
        forward gives forward_features' map, as timm's models do; 'embedding' puts it back; None keeps it."""
        if global_pool is not None:
            if global_pool not in ("", POOLED):
                raise ValueError(f"global_pool {global_pool!r}: a face model pools with its embedding block "
                                 f"({POOLED!r}) or not at all ('')")
            self.global_pool = global_pool
        self.num_classes = int(num_classes)
        like = next(self.parameters())  # the new classifier on the model's device and dtype, in its mode
        self.classifier = (nn.Linear(self.head_hidden_size, num_classes, device=like.device, dtype=like.dtype)
                           if num_classes > 0 else nn.Identity()).train(self.training)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": self.num_classes}
        self.default_cfg = self.pretrained_cfg
        if hasattr(self, "config"):
            self.config.pop("num_classes", None)
            if num_classes > 0:
                self.config["num_classes"] = self.num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The embedding (`_embed`: `pre_logits`, or without a classifier), then the classifier; with timm's
        reset_classifier(0, '') (no pooling) the map itself."""
        if self.global_pool == "":
            return x
        x = self._embed(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---------------------------------------------------------------------------------------- features
    def _final_norm(self):
        return getattr(self, self._final_norm_name) if self._final_norm_name else None

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The maps of the features in `indices` (feature_info's order, the stem first; an int n: the last n;
        None: all), and unless `intermediates_only` the last feature map too (what forward_features gives, or
        the map where `stop_early` stopped). `norm`: the model's final norm is applied to the last stage's map
        (IResNet's bn2; VarGFaceNet has none)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: face models give NCHW maps only")
        stages = self._stages()
        take, max_index = feature_take_indices(len(stages) + 1, indices)
        final_norm = self._final_norm()
        x = self._stem(x)
        intermediates = [x] if 0 in take else []
        for i, (_, stage) in enumerate(stages, start=1):
            if stop_early and i > max_index:
                break
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and isinstance(stage, nn.Sequential) else stage(x)
            if i in take:
                intermediates.append(final_norm(x) if norm and i == len(stages) and final_norm is not None else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one `indices` asks for (and the embedding block with `prune_head`,
        the final norm with `prune_norm`); returns the indices taken. A pruned model serves
        forward_intermediates only."""
        stages = self._stages()
        take, max_index = feature_take_indices(len(stages) + 1, indices)
        for name, _ in stages[max_index:]:
            self._replace(name, nn.Identity())
        if prune_norm and self._final_norm_name:
            self._replace(self._final_norm_name, nn.Identity())
        if prune_head:
            for name in self._head_names:
                self._replace(name, nn.Identity())
            self.reset_classifier(0)
        return take

    def _replace(self, dotted: str, module: nn.Module) -> None:
        parent_name, _, child = dotted.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        setattr(parent, child, module)
