"""facedistill: knowledge distillation for face recognition (VarGFaceNet students, frozen teachers).

`import distill` is light: it imports no torch, timm or numpy (so `distill --help` answers at once). The model
families (distill.models.vargfacenet, distill.models.iresnet, distill.models.timm_backbone) register in the model
registry (distill/models/registry.py; documented import path `distill.registry`) the first time the registry is
asked about a model, whoever imported what.

The students are also registered with timm, so `timm.create_model('vargfacenet')` works after `import distill`
in either order: when timm is already imported, `import distill` registers the families at once; otherwise a
one-shot import hook (`_TimmHook`, first on sys.meta_path) waits for `import timm`, removes itself, lets timm's
own module run and then registers them.
"""

import importlib.util
import sys

from distill.utils.errors import (
    CheckpointError,
    ConfigDeprecationWarning,
    ConfigError,
    DataFormatError,
    DistillError,
    UnknownNameError,
    UnsafeFileError,
)

__version__ = "0.1.0"
# the toolkit's exceptions, importable as distill.ConfigError etc. (distill.utils.errors is pure Python: no torch)
__all__ = ["CheckpointError", "ConfigDeprecationWarning", "ConfigError", "DataFormatError", "DistillError",
           "UnknownNameError", "UnsafeFileError"]


def _register_families() -> None:
    from distill.models.registry import _load_builtin_families

    _load_builtin_families()


class _TimmHook:
    """A sys.meta_path finder that finds nothing itself: on the first `import timm` it removes itself and
    wraps the exec_module of timm's own loader, so distill's families register right after timm has run."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "timm" or cls not in sys.meta_path:
            return None
        sys.meta_path.remove(cls)
        spec = importlib.util.find_spec(name)  # the finders after this one (timm not installed: None)
        loader = getattr(spec, "loader", None)
        if loader is not None and hasattr(loader, "exec_module"):
            exec_module = loader.exec_module

            def exec_then_register(module):
                del loader.exec_module  # the loader's own method again
                exec_module(module)
                _register_families()

            loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    _register_families()
elif _TimmHook not in sys.meta_path:
    sys.meta_path.insert(0, _TimmHook)
