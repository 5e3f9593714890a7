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


def test_import_distill_registers_the_students_with_timm_imported_before():
    proc = _python("import timm\nimport distill\n"
                   "m = timm.create_model('vargfacenet_depthwise', input_size=32, multiplier=0.25, last_channels=32, "
                   "units=[1, 1, 1])\nprint(type(m).__name__, m.config['group_size'])")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["VarGFaceNet", "1"]


def test_the_registry_knows_every_builtin_family_unasked():
    proc = _python("from distill.registry import canonical_name, list_models\n"
                   "print(canonical_name('r100'), ' '.join(list_models()))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, *names = proc.stdout.split()
    assert first == "iresnet100" and {"vargfacenet", "vargfacenet_depthwise", "iresnet18", "timm/<name>"} <= set(names)


def test_distill_run_loads_no_onnx_code(tmp_path):
    from tiny_experiment import write_experiment

    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, generations=1,
                           tracking={"wandb": "disabled"})
    loaded = _loaded(_python(
        "import json, sys\nfrom distill.cli import main\n"
        f"code = main(['run', {str(exp)!r}, '--dry-run', '--no-progress', '--out', {str(tmp_path / 'run')!r}])\n"
        "assert code == 0, code\nprint(json.dumps(sorted(sys.modules)))"))
    assert "distill.run.dry_run" in loaded and "distill.models.iresnet" in loaded  # the run did run
    assert not [m for m in loaded if _within(m, ONNX_CODE)]
