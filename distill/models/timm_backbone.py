"""Any timm backbone as a face teacher: the backbone's pooled features -> Linear -> BatchNorm1d embedding."""

from __future__ import annotations

import timm
import torch
from torch import nn

from distill.compat import register_legacy_keys
from distill.models.registry import check_name, register_model_family


class TimmBackbone(nn.Module):
    """`timm.create_model(name, num_classes=0)` plus an embedding head shaped like arcface_torch's
    (`fc` Linear to `embedding_size`, then `embedding_norm` BatchNorm1d with its weight fixed at 1; state dicts
    that call it `features`, its legacy name, still load: distill/compat.py).

    Output: (B, embedding_size) raw embeddings. `pretrained=True` downloads ImageNet weights through
    timm (needs network access); a face-trained checkpoint is loaded by `teachers.build_teacher`.
    """

    def __init__(self, name: str, embedding_size: int = 512, pretrained: bool = False,
                 input_size: int = 112, model_kwargs: dict | None = None):
        super().__init__()
        self.name = name  # config: the keyword arguments of the registered `timm/<name>` that rebuild it
        self.config = dict(embedding_size=embedding_size, input_size=input_size, model_kwargs=dict(model_kwargs or {}))
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **(model_kwargs or {}))
        self.fc = nn.Linear(self.backbone.num_features, embedding_size)
        self.embedding_norm = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.embedding_norm.weight, 1.0)
        self.embedding_norm.weight.requires_grad = False
        register_legacy_keys(self)  # a plain load_state_dict of a state dict with the legacy key names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_norm(self.fc(self.backbone(x)))

    @property
    def feature_info(self) -> list | None:
        """The backbone's feature stages (timm's feature_info), their modules named from this model (for the
        feature-map losses' hooks); None when the backbone has none."""
        info = getattr(self.backbone, "feature_info", None)
        if info is None:
            return None
        return [{**f, "module": f"backbone.{f['module']}"} for f in (info.info if hasattr(info, "info") else info)]


def _check_timm_name(name: str) -> None:
    check_name(name, timm.list_models(), "timm model")


@register_model_family("timm/", check=_check_timm_name)
def timm_backbone(name: str, embedding_size: int = 512, input_size: int = 112, pretrained: bool = False,
                  model_kwargs: dict | None = None) -> TimmBackbone:
    """`timm/<name>`: any timm backbone with an arcface_torch-style embedding head."""
    return TimmBackbone(name, embedding_size=embedding_size, pretrained=pretrained, input_size=input_size,
                        model_kwargs=model_kwargs)
