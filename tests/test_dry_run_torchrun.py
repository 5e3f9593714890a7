"""`distill run x.yaml --dry-run` under torchrun on CPU (gloo), with 2 and 3 ranks: every rank trains every stage of
the plan in one shared temporary folder, on stand-in data enough for a step at any world size; rank 0 speaks.

The ranks are forked from this process with torchrun's environment (tests/forked_ranks.py)."""

import os

import yaml
from forked_ranks import cli_ranks
from tiny_experiment import tiny_experiment

import distill.run.dry_run  # noqa: F401  (imported once here, not in every forked rank)
import distill.run.experiment  # noqa: F401


def test_dry_run_under_torchrun_with_two_and_three_ranks(tmp_path):
    # a trained teacher (every rank loads rank 0's file) and gen1, in P×K batches (groups of 2 at every rank)
    raw = tiny_experiment(tmp_path / "data", side=16, tracking={"wandb": "disabled"}, baseline=False, generations=1,
                          data={"images_per_id": 2})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    for world in (2, 3):
        codes, outs = cli_ranks(tmp_path, world, ["run", f"{tmp_path}/tiny.yaml", "--out", f"{tmp_path}/run",
                                                  "--dry-run", "dist.timeout_minutes=2"])
        assert codes == [0] * world, f"{world} ranks:\n" + "\n".join(outs)
        for stage in ("teacher", "gen1"):
            assert outs[0].count(f"dry run: {stage} ok") == 1, outs[0]
        assert outs[0].count("dry run passed") == 1 and not any("dry run" in out for out in outs[1:])  # rank 0 speaks
        made = [name for name in os.listdir(tmp_path / "scratch") if name.startswith("distill-dry-run-")]
        assert not made, made  # the shared folder removed, by rank 0, at the end
    assert not (tmp_path / "run").exists()  # nothing kept
