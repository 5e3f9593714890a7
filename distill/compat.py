"""Legacy spellings and formats that still load, each with what it maps to.

One place for every old spelling the toolkit still accepts, so the code that reads
configs, checkpoints and teacher specs only ever sees the current form. Each entry
names the old form, the current form it maps to, and the function that does the
mapping. Light: importing this module imports no torch.

Entries:
  (sections are appended below, one per area; each section's docstring lists its entries)
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------ teacher specs
# Legacy teacher spellings (config section `teacher:` and the spec of `teachers.build_teacher`), each -> what it
# maps to, with a ConfigDeprecationWarning saying what to write instead:
#   kind: iresnet, depth: D                    -> arch: iresnet<D>   (kind defaults to iresnet, depth to 100)
#   kind: timm, name: N                        -> arch: timm/<N>
#   kind: facedistill, student: {...} or arch + model_kwargs
#                                              -> arch: <name> with its arguments directly under teacher
#                                                 (embedding_size dropped: the architecture's own size applies)
#   kind: onnx, checkpoint: F                  -> onnx: F   (embedding_size, input_size dropped: read from the file)

def upgrade_legacy_teacher(spec: dict, error: type = ValueError) -> tuple[dict, str | None]:
    """A teacher spec (config section `teacher:` or `teachers.build_teacher`'s argument) in the legacy `kind:` form,
    in the current form, and a note saying what to write (None: the spec is already current). A legacy spec that
    cannot be mapped raises `error` (the callers pass ConfigError; this module imports nothing of distill, so every
    package may import it).

    iresnet (depth) -> arch iresnet<depth>; timm (name) -> arch timm/<name>; facedistill (`student:` in a
    config, or `arch` + `model_kwargs`) -> arch and its arguments; onnx (checkpoint) -> onnx. Other keys
    (checkpoint, cache, train, embedding_size, input_size ...) stay."""
    if not any(k in spec for k in ("kind", "depth", "name", "student", "model_kwargs")) or "onnx" in spec:
        return dict(spec), None
    spec = dict(spec)
    kind = spec.pop("kind", "iresnet")  # the old default kind
    if kind == "iresnet":
        spec["arch"] = f"iresnet{spec.pop('depth', 100)}"
        new = f"arch: {spec['arch']}"
    elif kind == "timm":
        if "name" not in spec:
            raise error("teacher: kind 'timm' needs 'name' (write arch: timm/<name> instead)")
        spec["arch"] = f"timm/{spec.pop('name')}"
        new = f"arch: {spec['arch']}"
    elif kind == "facedistill":
        arch = dict(spec.pop("student", None) or {})
        arch.update(spec.pop("model_kwargs", None) or {})
        arch.pop("init", None)
        name = arch.pop("arch", None) or spec.get("arch")
        if name is None:
            raise error("teacher: kind 'facedistill' needs 'arch' (a registered model name); write arch: <name>")
        spec.pop("embedding_size", None)  # the architecture's own embedding size always won
        spec = {**spec, **arch, "arch": name}
        new = f"arch: {name} with its arguments ({', '.join(sorted(arch)) or 'none'}) directly under teacher"
    elif kind == "onnx":
        spec["onnx"] = spec.pop("checkpoint", None)
        spec.pop("embedding_size", None), spec.pop("input_size", None)  # read from the file; were ignored
        new = f"onnx: {spec['onnx']}"
    else:
        raise error(f"teacher: unknown teacher kind {kind!r}; write arch: <model name> (see `distill "
                    f"profile --list`) or onnx: <file>")
    for key in ("depth", "name", "student", "model_kwargs"):
        spec.pop(key, None)
    return spec, f"teacher: 'kind: {kind}' is deprecated; write {new}"
