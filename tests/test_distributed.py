"""`torchrun --nproc_per_node=2 ... distill run` on CPU (gloo): data sharded, head sharded, one summary. The ranks
are forked with torchrun's environment (tests/forked_ranks.py); tests/test_teacher_cache.py runs torchrun itself."""

import json

import yaml
from forked_ranks import cli_ranks
from tiny_experiment import tiny_experiment

import distill.run.experiment  # noqa: F401  (imported once here, not in every forked rank)
from distill.utils.checkpoint import safe_torch_load


def test_two_process_run_completes_every_stage(tmp_path):
    raw = tiny_experiment(tmp_path / "data", train={"max_steps": 4, "batch_size": 12, "log_every": 2,
                                                    "eval_every": 0, "checkpoint_every": 2},
                          tracking={"wandb": "disabled"})
    raw["teacher"]["train"]["batch_size"] = 12
    # 16 x 16 images, the smallest side the models take: what is tested is the two processes, not the convolutions
    raw["data"]["input_size"] = raw["data"]["synthetic"]["size"] = raw["teacher"]["input_size"] = 16
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    codes, outs = cli_ranks(tmp_path, 2, ["run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"),
                                          "--no-progress"])
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "baseline", "gen1", "gen2"]
    assert outs[0].count("gen2: training") == 1 and "gen2: training" not in outs[1]  # rank 0 speaks for both
    ck = safe_torch_load(tmp_path / "run" / "gen2" / "last.pt")
    assert ck["compat"]["world_size"] == 2 and ck["step"] == 4
    assert ck["head_weight"].shape == (12, 32)  # all class centres gathered from both shards
