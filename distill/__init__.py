"""facedistill: knowledge distillation for face recognition (VarGFaceNet students, frozen teachers).

Importing `distill` registers the students with timm, so `timm.create_model('vargfacenet')` works.
"""

__version__ = "0.1.0"

from distill.errors import (  # noqa: F401  (re-exported for users)
    CheckpointError,
    ConfigError,
    DataFormatError,
    DistillError,
    UnknownNameError,
    UnsafeFileError,
)
from distill import students  # noqa: F401,E402  (registers the students)
