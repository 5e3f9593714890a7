"""Loading the model a command line names (`distill eval`, `distill ijb`): an insightface `.onnx` file through
the ONNX teacher loader (`teachers.build_teacher`), anything else as `distill.models.files.load_model` reads it
(student.pt, a plain state dict with --arch, a model name)."""

from __future__ import annotations

import os
import sys


def load_model_for(command: str, source: str, arch: str | None = None, input_size: int | None = None):
    """(model in eval mode, input size) for a command line, with a note when --input-size disagrees with what the
    model records, and an error when the size is unknown."""
    from distill.models import files
    from distill.utils.errors import ConfigError

    if source.endswith(".onnx") and os.path.exists(source):  # a frozen ONNX Runtime model, run as teachers are
        import teachers

        model = teachers.build_teacher({"onnx": source})
        recorded = model.input_size
    else:
        model, recorded = files.load_model(source, arch=arch, input_size=input_size)
    if recorded is not None and input_size and input_size != recorded:
        print(f"distill {command}: note: {source} was built for {recorded}x{recorded} inputs; using {recorded}, "
              f"not --input-size {input_size}", file=sys.stderr)
    size = recorded or input_size
    if size is None:
        raise ConfigError(f"{source}: cannot infer the model's input size; pass --input-size "
                          f"(112 for arcface_torch and insightface models)")
    return model, size
