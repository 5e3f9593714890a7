"""`torchrun --nproc_per_node=2 ... distill run` on CPU (gloo): data sharded, head sharded, one summary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tiny_experiment import tiny_experiment

from distill.utils.checkpoint import safe_torch_load


def test_two_process_run_completes_every_stage(tmp_path):
    raw = tiny_experiment(tmp_path / "data", train={"max_steps": 4, "batch_size": 12, "log_every": 2,
                                                    "eval_every": 0, "checkpoint_every": 2},
                          tracking={"wandb": "disabled"})
    raw["teacher"]["train"]["batch_size"] = 12
    # 16 x 16 images, the smallest side the models take: what is tested is the two processes, not the convolutions
    raw["data"]["input_size"] = raw["data"]["synthetic"]["size"] = raw["teacher"]["input_size"] = 16
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "distill.cli", "run", str(tmp_path / "tiny.yaml"),
                           "--out", str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True,
                          timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "baseline", "gen1", "gen2"]
    assert proc.stdout.count("gen2: training") == 1  # rank 0 speaks for both
    ck = safe_torch_load(tmp_path / "run" / "gen2" / "last.pt")
    assert ck["compat"]["world_size"] == 2 and ck["step"] == 4
    assert ck["head_weight"].shape == (12, 32)  # all class centres gathered from both shards
