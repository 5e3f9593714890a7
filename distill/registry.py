"""`distill.registry`: the documented import path of the model registry, an alias of distill.models.registry
(same functions, same registry; see that module for create_model, list_models, register_model, ...).

    from distill.registry import create_model, list_models, register_model
"""

from distill.models.registry import (
    BUILTIN_FAMILIES,
    ModelEntry,
    canonical_name,
    check_model_kwargs,
    check_model_name,
    check_name,
    create_model,
    did_you_mean,
    list_models,
    model_defaults,
    register_model,
    register_model_family,
    resolve,
)

__all__ = [
    "BUILTIN_FAMILIES",
    "ModelEntry",
    "canonical_name",
    "check_model_kwargs",
    "check_model_name",
    "check_name",
    "create_model",
    "did_you_mean",
    "list_models",
    "model_defaults",
    "register_model",
    "register_model_family",
    "resolve",
]
