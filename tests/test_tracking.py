"""W&B tracking of a tiny experiment, read back from the offline run files; failures never stop training."""

import glob
import hashlib
import json
import os
import struct
import time
import warnings
import zlib

import pytest
from tiny_experiment import write_experiment

from distill.config.schema import load_config
from distill.run.context import silent_logger
from distill.run.experiment import run_experiment
from distill.train.tracking import Tracker, TrackingWarning, WandbTracker, read_metrics, resolve_mode, stage_tracker
from distill.utils.errors import ConfigError

FAKE_KEY = "local-0123456789abcdef0123456789abcdef01234567"  # must never reach a file


def wandb_records(path: str):
    """Records of an offline run file: W&B's LevelDB-style log (7-byte header ':W&B' + magic + version,
    32 KiB blocks of chunks: crc32 of type+data, length, type FULL/FIRST/MIDDLE/LAST) of
    wandb_internal_pb2.Record messages. wandb 0.31 ships no Python reader (its DataStore was removed)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zero padding, or a record still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: corrupt record at {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_run(path: str) -> dict:
    """The run's records; W&B's service writes them asynchronously, so wait (up to 30 s) for the exit record."""
    deadline = time.monotonic() + 30
    records = list(wandb_records(path))
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = list(wandb_records(path))
    run = {"history": [], "summary": {}, "metrics": {}, "artifacts": [], "use_artifact": 0, "exit": False}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["run"] = rec.run
            run["config"] = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "summary":
            run["summary"].update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                   for u in rec.summary.update})
        elif kind == "metric":
            run["metrics"][rec.metric.name or rec.metric.glob_name] = rec.metric.summary
        elif kind == "artifact":
            run["artifacts"].append(rec.artifact)
        elif kind == "use_artifact":
            run["use_artifact"] += 1
        elif kind == "exit":
            run["exit"] = True
    return run


def wandb_runs(run_dir) -> dict:
    """job_type -> runs (in file order) of every offline W&B run under run_dir/wandb."""
    out = {}
    for path in sorted(glob.glob(os.path.join(str(run_dir), "wandb", "offline-run-*", "run-*.wandb"))):
        run = read_wandb_run(path)
        out.setdefault(run["run"].job_type, []).append(run)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "faces"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:  # the conftest's W&B isolation is per test; this runs once
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_API_KEY", FAKE_KEY)
        path = write_experiment(tmp / "tiny.yaml", data_dir, side=16)
        run_experiment(load_config(str(path)), str(tmp / "run"), progress=False, logger=silent_logger())
    return tmp, tmp / "run", wandb_runs(tmp / "run")


def test_each_stage_is_one_offline_wandb_run_with_group_job_type_and_config(tracked):
    _, run_dir, runs = tracked
    assert sorted(runs) == ["baseline", "gen1", "gen2", "teacher"] and all(len(r) == 1 for r in runs.values())
    digest = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    assert (run_dir / "wandb_group.txt").read_text().strip() == digest
    generations = {"teacher": 0, "baseline": 0, "gen1": 1, "gen2": 2}
    for stage, [run] in runs.items():
        assert run["exit"]  # finished
        assert run["run"].run_group == f"tiny-{digest}"
        assert run["run"].display_name == f"tiny/{stage}" and run["run"].project == "facedistill"
        assert run["run"].run_id == (run_dir / stage / "wandb_run_id.txt").read_text().strip()
        config = run["config"]
        assert config["generation"] == generations[stage] and config["stage"] == stage
        assert config["distill"]["alpha"] == 7.0 and config["student"]["multiplier"] == 0.5  # the resolved config
        assert config["run_dir"] == os.path.abspath(run_dir)
    assert runs["gen2"][0]["config"]["init_from"] == str(run_dir / "gen1" / "student.pt")
    assert runs["gen1"][0]["config"]["init_from"] is None
    for stage, [run] in runs.items():  # every stage names its model, the teacher included
        result = json.loads((run_dir / stage / "result.json").read_text())
        assert run["summary"]["model/arch"] == ("iresnet18" if stage == "teacher" else "vargfacenet") == result["arch"]
        assert run["summary"]["model/params"] == result["params"] > 0
        assert run["summary"]["model/gflops"] == result["gflops"] > 0
    assert runs["teacher"][0]["summary"]["model/params"] > 10 * runs["gen1"][0]["summary"]["model/params"]


def test_validation_metrics_in_wandb_match_the_local_log_with_best_and_last(tracked):
    _, run_dir, runs = tracked
    for stage in ("baseline", "gen1", "gen2"):
        [run] = runs[stage]
        local = read_metrics(str(run_dir / stage))
        key = "val/synth_val/acc"
        wandb_acc = [(h["_step"], h[key]) for h in run["history"] if key in h]
        local_acc = [(m["step"], m[key]) for m in local if key in m]
        assert wandb_acc == local_acc and [s for s, _ in local_acc] == [2, 4]  # eval_every 2 of 4 steps
        result = json.loads((run_dir / stage / "result.json").read_text())
        assert wandb_acc[-1][1] == result["metrics"]["synth_val"]["acc_mean"]
        assert run["summary"][key] == {"max": max(a for _, a in wandb_acc), "last": wandb_acc[-1][1]}
        assert run["metrics"][key].max and run["metrics"][key].last
        assert run["metrics"]["val/synth_val/tar_at_far_1e-3"].max
        assert [h["_step"] for h in run["history"] if "train/loss" in h] == [1, 2, 3, 4]
        assert {"train/loss_cls", "train/lr", "train/images_per_s"} <= {k for h in run["history"] for k in h}


def test_each_student_is_a_model_artifact_and_offline_lineage_lives_in_the_config(tracked):
    _, run_dir, runs = tracked
    names = {}
    for stage, [run] in runs.items():
        [artifact] = run["artifacts"]
        names[stage] = (run_dir / stage / "wandb_artifact.txt").read_text().strip()
        assert artifact.type == "model" and artifact.name == names[stage]
        assert [c.path for c in artifact.manifest.contents] == ["student.pt"]
        assert json.loads(artifact.metadata)["generation"] == run["config"]["generation"]
        assert run["use_artifact"] == 0  # refused offline by W&B
    assert runs["gen2"][0]["config"]["input_artifacts"] == [names["gen1"], names["teacher"]]
    assert runs["baseline"][0]["config"]["input_artifacts"] == []


def test_no_api_key_is_written_anywhere(tracked):
    tmp, _, _ = tracked
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert FAKE_KEY.encode() not in f.read(), os.path.join(root, name)


def test_a_resumed_stage_continues_its_wandb_run_in_the_kept_group(tracked, tmp_path):
    tmp, _, _ = tracked
    cfg = load_config(str(tmp / "tiny.yaml"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_group.txt").write_text("0123abcd\n")  # a moved run directory keeps its group
    first = stage_tracker(cfg, str(run_dir), "gen1", 1, None)
    first.log({"train/loss": 2.0}, 1)  # then the stage raises: its W&B run is never finished
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # W&B must not refuse the id as "in use"
        second = stage_tracker(cfg, str(run_dir), "gen1", 1, None)
    assert first.run is None and second.run is not None
    second.log({"train/loss": 1.0}, 2)
    second.finish()
    [a, b] = wandb_runs(run_dir)["gen1"]
    assert a["run"].run_id == b["run"].run_id == (run_dir / "gen1" / "wandb_run_id.txt").read_text().strip()
    assert a["run"].run_group == b["run"].run_group == "tiny-0123abcd"
    assert [m["step"] for m in read_metrics(str(run_dir / "gen1"))] == [1, 2]


def _one_stage(tmp_path, data_dir):
    path = write_experiment(tmp_path / "one.yaml", data_dir, side=16, teacher=None, baseline=False, generations=1,
                            train={"max_steps": 2})
    return load_config(str(path))


@pytest.mark.parametrize("failure", ["unwritable wandb dir", "init raises", "log raises"])
def test_a_wandb_failure_warns_once_and_training_goes_on(tmp_path, data_dir, monkeypatch, failure):
    import wandb
    cfg = _one_stage(tmp_path, data_dir)
    run_dir = tmp_path / "run"
    if failure == "unwritable wandb dir":
        run_dir.mkdir()
        (run_dir / "wandb").write_text("a file where W&B wants its directory")
    elif failure == "init raises":
        monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("W&B is down")))
    else:
        monkeypatch.setattr(wandb.Run, "log", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_experiment(cfg, str(run_dir), progress=False, logger=silent_logger())
    tracking = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking) == 1 and "training continues" in str(tracking[0].message)
    assert summary["stages"][0]["stage"] == "gen1" and 0 <= summary["stages"][0]["metrics"]["synth_val"]["acc_mean"]
    local = read_metrics(str(run_dir / "gen1"))
    assert [m["step"] for m in local if "train/loss" in m] == [1, 2] and "val/synth_val/acc" in local[-1]


def test_mode_from_config_and_environment(tmp_path):
    netrc = tmp_path / "netrc"
    none = {"NETRC": str(tmp_path / "missing")}
    assert resolve_mode("online", {**none, "WANDB_MODE": "offline"}) == "offline"  # the environment wins
    assert resolve_mode("offline", {**none, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("auto", {**none, "WANDB_DISABLED": "true"}) == "disabled"
    assert resolve_mode("disabled", none) == "disabled"
    assert resolve_mode("auto", none) == "offline"  # no credentials
    assert resolve_mode("auto", {**none, "WANDB_API_KEY": FAKE_KEY}) == "online"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert resolve_mode("auto", {"NETRC": str(netrc)}) == "online"
    assert resolve_mode("auto", {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'.*auto, online, offline, disabled"):
        resolve_mode("auto", {**none, "WANDB_MODE": "sometimes"})


def test_disabled_mode_and_other_ranks_keep_only_the_local_log(tmp_path, data_dir, monkeypatch):
    import wandb
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(str(write_experiment(tmp_path / "e.yaml", data_dir, side=16, tracking={"wandb": "disabled"})))
    tracker = stage_tracker(cfg, str(tmp_path / "run"), "gen1", 1, None)
    assert type(tracker) is Tracker
    (tmp_path / "run" / "gen1").mkdir(parents=True)  # made by the engine
    tracker.log({"train/loss": 1.0}, 1)
    assert [m["train/loss"] for m in read_metrics(str(tmp_path / "run" / "gen1"))] == [1.0]
    monkeypatch.setenv("WANDB_MODE", "offline")
    import distill.train.tracking
    # a DDP worker: the driver does not pass its rank
    monkeypatch.setattr(distill.train.tracking, "dist_rank", lambda: 1)
    other = stage_tracker(cfg, str(tmp_path / "run2"), "gen1", 1, None)
    assert type(other) is Tracker and other.rank == 1
    other.log({"train/loss": 1.0}, 1)
    assert not os.path.exists(other.path) and not (tmp_path / "run" / "wandb").exists()


def test_under_a_sweep_agent_the_last_stage_is_the_trial_run(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep42")
    monkeypatch.setenv("WANDB_RUN_ID", "trial7")
    cfg = load_config(str(write_experiment(tmp_path / "e.yaml", data_dir, side=16)))
    for stage, generation in (("teacher", 0), ("gen2", 2)):
        tracker = stage_tracker(cfg, str(tmp_path / "run"), stage, generation, None)
        assert isinstance(tracker, WandbTracker) and not tracker.failed
        tracker.finish()
    runs = wandb_runs(tmp_path / "run")
    assert runs["gen2"][0]["run"].run_id == "trial7" and runs["gen2"][0]["run"].sweep_id == "sweep42"
    assert runs["teacher"][0]["run"].run_id != "trial7" and runs["teacher"][0]["run"].sweep_id == ""
    assert runs["teacher"][0]["run"].project == "facedistill"
