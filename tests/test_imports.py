"""What importing the code costs at run time: the `distill` command registers every subcommand, also as
`python -m distill.cli`, and `distill --help` imports neither torch nor timm; `import distill` is light and
registers the students with timm in either import order; `distill run` loads no ONNX code.

The layering rules read from the source (layers, cycles, module length, argparse only in the CLI) are
tests/test_layering.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_layering import CLI, COMMAND_NAMES, MODULES, ONNX_CODE, _within


def _python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(REPO), env=env,
                          timeout=timeout)


def _loaded(proc: subprocess.CompletedProcess) -> list:
    """The module names a child printed as its last stdout line (JSON)."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# One interpreter imports timm (torch with it: 3-4 s of CPU), then forks a child per snippet, whose output and exit
# status come back as a subprocess.CompletedProcess's: each child starts as a fresh interpreter with timm imported
# first and nothing of distill loaded, which is all its test needs (the test of an import without torch or timm runs
# a fresh interpreter of its own).
_AFTER_TIMM = """
import json, os, sys, tempfile, traceback
import timm
snippets, results = json.loads(sys.stdin.read()), {}
for name, code in snippets.items():
    out, err = (tempfile.TemporaryFile(mode="w+") for _ in range(2))
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        status = 0
        try:
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    results[name] = [status] + [(f.seek(0), f.read())[1] for f in (out, err)]
print(json.dumps(results))
"""


def _python_after_timm(snippets: dict) -> dict:
    """{name: CompletedProcess} of each snippet, each run in a child forked after `import timm` (above)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, "-c", _AFTER_TIMM], input=json.dumps(snippets), capture_output=True,
                          text=True, cwd=Path(REPO), env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: subprocess.CompletedProcess(name, *result)
            for name, result in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def after_timm(tmp_path_factory) -> dict:
    """The snippets of this file's tests that import timm anyway, run once (_python_after_timm)."""
    from tiny_experiment import write_experiment

    tmp = tmp_path_factory.mktemp("imports")
    exp = write_experiment(tmp / "x.yaml", tmp / "faces", side=16, generations=1, tracking={"wandb": "disabled"})
    return _python_after_timm({
        "timm before": "import timm\nimport distill\n"
                       "m = timm.create_model('vargfacenet_depthwise', input_size=32, multiplier=0.25, "
                       "last_channels=32, units=[1, 1, 1])\nprint(type(m).__name__, m.config['group_size'])",
        "registry": "from distill.registry import canonical_name, list_models\n"
                    "print(canonical_name('r100'), ' '.join(list_models()))",
        "dry run": "import json, sys\nfrom distill.cli import main\n"
                   f"code = main(['run', {str(exp)!r}, '--dry-run', '--no-progress', '--out', {str(tmp / 'run')!r}])\n"
                   "assert code == 0, code\nprint(json.dumps(sorted(sys.modules)))"})


def test_every_command_module_is_registered():
    import distill.cli

    in_package = {name for name in MODULES if name.startswith(CLI + ".") and name != CLI + ".__main__"}
    assert set(distill.cli.COMMANDS) == in_package


def test_distill_help_lists_every_command(capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMAND_NAMES) <= listed, out


def test_python_m_distill_cli_runs_the_command(capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], capture_output=True, text=True,
                              cwd=Path(REPO), env=env, timeout=300)
        seconds.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("usage: distill") and all(name in proc.stdout for name in COMMAND_NAMES)
    with capsys.disabled():  # measured, not asserted (a shared machine is noisy): the guard is the next test
        print(f"\n`python -m distill.cli --help`: median {statistics.median(seconds):.2f} s of 5 runs")


def test_distill_help_imports_neither_torch_nor_timm():
    loaded = _loaded(_python(
        "import json, sys\nfrom distill.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))"))
    assert "distill.cli.export" in loaded  # every command's parser was built
    assert not [m for m in loaded if _within(m, ("torch", "timm") + ONNX_CODE)]


def test_help_text_shows_library_constants_read_when_printed(capsys):
    from distill.cli import main
    from distill.data.ijb import TARGETS
    from distill.deploy.quantize import DEFAULT_CALIB_IMAGES, INT8_SUFFIX

    for argv, shown in ((["export", "--help"], [f"OUT{INT8_SUFFIX}", f"(default {DEFAULT_CALIB_IMAGES})"]),
                        (["compare", "--help"], [f"(default {DEFAULT_CALIB_IMAGES})"]),
                        (["ijb", "--help"], [", ".join(TARGETS)]),
                        (["data", "synth-ijb", "--help"], [", ".join(TARGETS)])):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())
        assert all(s in out for s in shown), (argv, out)
    # the choices are checked by the handler
    assert main(["ijb", "--root", "nowhere", "--target", "ijbx", "--features", "f.npy"]) == 2
    assert main(["data", "synth-ijb", "nowhere", "--target", "ijbx"]) == 2
    assert capsys.readouterr().err.count(f"--target IJBX: one of {', '.join(TARGETS)}") == 2


def test_import_distill_is_light_and_registers_the_students_with_timm_imported_later():
    loaded = _loaded(_python(
        "import json, sys\nimport distill\nbefore = sorted(sys.modules)\nimport timm\n"
        "m = timm.create_model('vargfacenet', input_size=32, multiplier=0.25, last_channels=32, units=[1, 1, 1])\n"
        "assert type(m).__name__ == 'VarGFaceNet', type(m)\n"
        "assert distill._TimmHook not in sys.meta_path  # it removed itself\n"
        "print(json.dumps(before))"))
    assert "distill" in loaded and not [m for m in loaded if _within(m, ("torch", "timm", "numpy"))]


def test_import_distill_registers_the_students_with_timm_imported_before(after_timm):
    proc = after_timm["timm before"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["VarGFaceNet", "1"]


def test_the_registry_knows_every_builtin_family_unasked(after_timm):
    proc = after_timm["registry"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, *names = proc.stdout.split()
    assert first == "iresnet100" and {"vargfacenet", "vargfacenet_depthwise", "iresnet18", "timm/<name>"} <= set(names)


def test_distill_run_loads_no_onnx_code(after_timm):
    loaded = _loaded(after_timm["dry run"])
    assert "distill.run.dry_run" in loaded and "distill.models.iresnet" in loaded  # the run did run
    assert not [m for m in loaded if _within(m, ONNX_CODE)]
