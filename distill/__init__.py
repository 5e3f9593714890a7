"""facedistill: knowledge distillation for face recognition (VarGFaceNet students, frozen teachers).

Importing `distill` registers every architecture in the model registry (distill/models/registry.py): the
students (also with timm, so `timm.create_model('vargfacenet')` works), the IResNets and `timm/<name>`.
"""

__version__ = "0.1.0"

from distill.utils.errors import (  # noqa: F401  (re-exported for users)
    CheckpointError,
    ConfigDeprecationWarning,
    ConfigError,
    DataFormatError,
    DistillError,
    UnknownNameError,
    UnsafeFileError,
)
# the model families: each registers its architectures when imported
from distill import students  # noqa: F401,E402
import teachers.iresnet  # noqa: F401,E402
import teachers.timm_backbone  # noqa: F401,E402
