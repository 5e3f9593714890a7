"""Students: lightweight face models, each registered in the model registry (distill/models/registry.py).

A student is one decorated function in one file of this package (see vargfacenet.py, the end of the
file), imported here; `distill.models.registry.create_model(name, **kwargs)` then builds it, and
`timm.create_model(name, ...)` too for the ones registered with `timm=True`.
"""

from distill.students import vargfacenet  # noqa: F401  (registers vargfacenet, vargfacenet_depthwise)
