"""Run timm's own model tests (tests/test_models.py of the installed timm version) against facedistill's face
models: `python -m tools.timm_model_tests [--src DIR] [-- PYTEST ARGS]`.

timm's test file is not part of this repository: it is read from timm's source distribution of the installed
version (pip download, cached under ~/.cache/facedistill/timm-<version>/), or from --src (a checkout of
pytorch-image-models at that version). A conftest beside it imports `distill` (which registers the face
models with timm) and keeps only the tests whose `model_name` is one of them. Prints pytest's summary;
exits with pytest's code."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile

FACE_MODELS = ("vargfacenet", "vargfacenet_depthwise", "iresnet18", "iresnet34", "iresnet50", "iresnet100",
               "iresnet200", "r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large")

CONFTEST = '''
import distill  # noqa: F401 - registers the face models with timm
from distill.models.registry import list_models

list_models()  # every built-in family imported: the face models are registered with timm before collection
FACE = set(%r)


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if getattr(i, "callspec", None) and i.callspec.params.get("model_name") in FACE]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
'''


def timm_tests(src: str | None) -> str:
    """The folder holding timm's tests/test_models.py for the installed timm version."""
    import timm

    if src:
        path = os.path.join(src, "tests")
        if not os.path.isfile(os.path.join(path, "test_models.py")):
            raise SystemExit(f"--src {src}: no tests/test_models.py there (a pytorch-image-models checkout)")
        return path
    cache = os.path.join(os.path.expanduser("~"), ".cache", "facedistill", f"timm-{timm.__version__}")
    tests = os.path.join(cache, "tests")
    if not os.path.isfile(os.path.join(tests, "test_models.py")):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-deps",
                            "--no-binary", ":all:", "-d", tmp, "-q"], check=True)
            archive = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz"))
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if "/tests/" in m.name and m.name.endswith(".py")]
                for m in members:
                    m.name = os.path.join("tests", m.name.split("/tests/", 1)[1])
                tar.extractall(cache, members=members, filter="data")
    return tests


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="a pytorch-image-models checkout at the installed timm version")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    source = timm_tests(args.src)
    with tempfile.TemporaryDirectory() as run:
        for name in ("test_models.py", "__init__.py"):
            if os.path.exists(os.path.join(source, name)):
                with open(os.path.join(source, name), encoding="utf-8") as f, \
                        open(os.path.join(run, name), "w", encoding="utf-8") as g:
                    g.write(f.read())
        with open(os.path.join(run, "conftest.py"), "w", encoding="utf-8") as f:
            f.write(CONFTEST % (FACE_MODELS,))
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", run,
                               run, *args.pytest_args], cwd=run, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
