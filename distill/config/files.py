"""Experiment files as raw data: YAML read with `yaml.safe_load` (errors name the file), `base:` chains
merged child over parent (remembering which file set each key, for error messages), dotted overrides in
both forms `train.lr=0.05` / `--train.lr=0.05`. distill/config/schema.py turns the result into a typed,
validated config; grid files (distill/run/sweep.py) use the same reader.
"""

from __future__ import annotations

import io
import os

import yaml

from distill.utils.errors import ConfigError


class _UniqueKeys:
    """A loader mixin (builds only plain data, runs nothing) that refuses a key given twice in one mapping,
    where safe_load would silently keep the last one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first != key_node.start_mark.line + 1:
                raise ConfigError(f"{key_node.start_mark.name}: line {key_node.start_mark.line + 1}: key {key!r} "
                                  f"is given twice in one mapping (first on line {first}); keep one of them")
        return super().construct_mapping(node, deep)


class _UniqueKeySafeLoader(_UniqueKeys, yaml.SafeLoader):
    """yaml.SafeLoader (pure Python) refusing duplicate keys: its errors are the ones users see."""


# libyaml's parser (PyYAML built with it) feeding the same safe constructor and resolver: the same data,
# several times faster. Its error texts differ from the pure-Python parser's, so anything it refuses is
# parsed again by the pure-Python loader, whose result or error is the one returned.
_CSafeLoader = getattr(yaml, "CSafeLoader", None)
_UniqueKeyCSafeLoader = type("_UniqueKeyCSafeLoader", (_UniqueKeys, _CSafeLoader), {}) if _CSafeLoader else None


class _NamedText(io.StringIO):
    """Text with a `name`: libyaml's parser names its marks after the stream's `name`."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.name = name


def _run_loader(loader_class, stream, name: str):
    loader = loader_class(stream)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_error_line(err: yaml.YAMLError) -> str:
    """A YAML parse error on one line: where (line, column) and what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_yaml_text(stream, name: str = "<text>"):
    """yaml.safe_load's result (plain data only); a duplicate key is a ConfigError naming it and its line.
    `stream` is a str or a text file (read from its current position; a file must be seekable)."""
    if _UniqueKeyCSafeLoader is not None:
        start = None if isinstance(stream, str) else stream.tell()
        try:
            text = stream if start is None else stream.read()
            return _run_loader(_UniqueKeyCSafeLoader, _NamedText(text, name), name)
        except Exception:  # noqa: BLE001 - the pure-Python loader below gives the result or error users see
            if start is not None:
                stream.seek(start)
    return _run_loader(_UniqueKeySafeLoader, stream, name)


def safe_load(text: str):
    """yaml.safe_load(text) exactly (duplicate keys keep the last), with libyaml's parser where PyYAML has it."""
    if _CSafeLoader is not None:
        try:
            return yaml.load(text, Loader=_CSafeLoader)  # noqa: S506 - a safe loader
        except Exception:  # noqa: BLE001 - yaml.safe_load gives the result or error users see
            pass
    return yaml.safe_load(text)


def read_yaml_mapping(path: str, what: str = "experiment file", fix: str | None = None) -> dict:
    """A YAML file that must hold a mapping, read with safe_load; errors name the file (and `fix`, what to do
    about a damaged one)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml_text(f, path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the {what} (a .yaml file) itself") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_error_line(err)}); {fix or 'correct the ' + what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a mapping of keys, got {type(data).__name__}"
                          + (f"; {fix}" if fix else ""))
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_experiment(base: dict, over: dict, own_keys: dict, model_args=None) -> dict:
    """`_merge`, except that a section's model arguments belong to its model: a child file or override that
    names another `arch` (or an `onnx` file) for a section of `own_keys` (student, teacher) keeps of the old
    model's arguments those the new one takes (`model_args(arch)`: their names; e.g. `teacher.arch=timm/resnet10t`
    over an IResNet teacher keeps its embedding_size and input_size) and drops the rest (`teacher.arch=iresnet18`
    over a VarGFaceNet teacher drops its multiplier; an ONNX file takes none); the section's own keys
    (`own_keys[section]`: checkpoint, cache, train, init, ...) are kept. Likewise `distill.terms` replaces the
    `distill.loss` + `distill.alpha` of the files below it (the other way round is an error the config names: the
    terms are not dropped silently)."""
    base = dict(base)
    for name, own in own_keys.items():
        old, new = base.get(name), over.get(name)
        if not (isinstance(old, dict) and isinstance(new, dict)):
            continue
        if any(k in new and new[k] != old.get(k) for k in ("arch", "onnx")):
            arch = new.get("arch") if "onnx" not in new else None
            takes = set(model_args(arch)) if model_args is not None and isinstance(arch, str) else set()
            base[name] = {k: v for k, v in old.items() if k in own or k in takes}
    old, new = base.get("distill"), over.get("distill")
    if isinstance(old, dict) and isinstance(new, dict) and new.get("terms") is not None:
        base["distill"] = {k: v for k, v in old.items() if k not in ("loss", "alpha")}  # terms replace the short form
    return _merge(base, over)


def load_with_bases(path: str, own_keys: dict, seen: tuple = (), model_args=None) -> tuple[dict, dict]:
    """Merged raw dict and, for every top-level key path, the file it came from (for error messages);
    `own_keys`, `model_args`: merge_experiment's."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(seen)})")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    merged, origin = {}, {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' must be a file name, got {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.exists(base_path):
            raise ConfigError(f"{path}: key 'base': base file {base_path} not found")
        merged, origin = load_with_bases(base_path, own_keys, seen + (path,), model_args)
    merged = merge_experiment(merged, data, own_keys, model_args)
    origin.update({k: path for k in key_paths(data)})
    return merged, origin


def key_paths(d: dict, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict):
            out += key_paths(v, key + ".")
    return out


MAX_KEY_DEPTH = 8  # the deepest key is 3 levels (data.synthetic.ids); deeper is a typo or an attack on the parser


def parse_overrides(args: list) -> dict:
    """`a.b=1` / `--a.b=1` (values parsed as YAML scalars) -> nested dict."""
    out: dict = {}
    for arg in args:
        text = arg[2:] if arg.startswith("--") else arg
        if "=" not in text:
            raise ConfigError(f"override {arg!r}: expected key.sub=value (or --key.sub=value)")
        key, raw = text.split("=", 1)
        if key.count(".") >= MAX_KEY_DEPTH:
            raise ConfigError(f"override {arg[:80]!r}{'...' if len(arg) > 80 else ''}: key {key.count('.') + 1} levels "
                              f"deep; experiment keys have at most {MAX_KEY_DEPTH} (e.g. teacher.train.lr)")
        try:
            value = safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {p!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out
