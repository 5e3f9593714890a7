"""Joining torchrun's process group (distill/utils/dist.py): the backend follows the run's device, each rank binds
its own GPU, the timeout is the config's, and the waits between ranks go through gloo (never NCCL's watchdog)."""

import functools
import multiprocessing
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from distill.config.schema import build_config
from distill.utils import dist as ddist
from distill.utils.errors import ConfigError


@pytest.fixture
def two_ranks_with_cuda(monkeypatch):
    """Rank 1 of 2 on a machine that reports two GPUs; init_process_group and new_group record their arguments."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.setdefault("init", (a, k)))
    monkeypatch.setattr(dist, "new_group", lambda **k: calls.setdefault("new_group", k) and "the gloo group")
    monkeypatch.setattr(ddist, "_WAIT_GROUP", None)
    return calls


def test_device_cpu_under_torchrun_uses_gloo_even_with_cuda_present(two_ranks_with_cuda):
    ddist.init_distributed("cpu", timeout_minutes=7)
    args, kwargs = two_ranks_with_cuda["init"]
    assert args == ("gloo",) and kwargs == {"timeout": timedelta(minutes=7)}
    assert "set_device" not in two_ranks_with_cuda and "new_group" not in two_ranks_with_cuda


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_gpus_get_nccl_for_cuda_gloo_for_cpu_and_the_ranks_own_gpu(two_ranks_with_cuda, device, monkeypatch):
    ddist.init_distributed(device, timeout_minutes=45)
    args, kwargs = two_ranks_with_cuda["init"]
    assert args == ("cuda:nccl,cpu:gloo",)
    assert kwargs == {"timeout": timedelta(minutes=45), "device_id": torch.device("cuda", 1)}
    assert two_ranks_with_cuda["set_device"] == 1
    assert two_ranks_with_cuda["new_group"] == {"backend": "gloo", "timeout": timedelta(minutes=45)}
    waits = []  # the waits go through the gloo group, not the default (NCCL for CUDA tensors) one
    monkeypatch.setattr(dist, "barrier", lambda group=None: waits.append(group))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, group, device: waits.append(group))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group: waits.append(group))
    ddist.rank0_first(lambda: None)
    ddist.from_rank0("x")
    ddist.all_gather_objects("x")
    assert waits == ["the gloo group"] * 3


def test_one_gpu_for_every_rank_is_refused_naming_the_key(two_ranks_with_cuda):
    with pytest.raises(ConfigError, match=r"key 'device'.*every rank would use GPU 1.*device: cuda or auto"):
        ddist.init_distributed("cuda:1")
    assert "init" not in two_ranks_with_cuda


def test_no_torchrun_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group without torchrun"))
    ddist.init_distributed("cuda:1")  # one process may use any GPU
    assert ddist.all_gather_objects({"a": 1}) == [{"a": 1}] and ddist.from_rank0(3) == 3


def test_timeout_is_a_config_key_that_must_be_positive():
    data = {"train": "faces"}
    assert build_config({"data": data}).dist.timeout_minutes == ddist.DEFAULT_TIMEOUT_MINUTES
    assert build_config({"data": data, "dist": {"timeout_minutes": 90}}).dist.timeout_minutes == 90.0
    with pytest.raises(ConfigError, match=r"dist.timeout_minutes' must be positive"):
        build_config({"data": data, "dist": {"timeout_minutes": 0}})


def _worker(rank, tmp, timeout_minutes):
    """Joins through init_distributed (file rendezvous instead of torchrun's env://) and uses every wait."""
    import os
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group = functools.partial(dist.init_process_group, init_method=f"file://{tmp}/rendezvous",
                                                rank=rank, world_size=2)
    ddist.init_distributed("cpu", timeout_minutes=timeout_minutes)
    out = {}
    try:
        order = []
        ranks_first = ddist.rank0_first(lambda: order.append(time.monotonic()) or ddist.rank())
        out.update(first=ranks_first, at=order[0], value=ddist.from_rank0(f"from {rank}"),
                   gathered=ddist.all_gather_objects({"rank": rank}))
        def fails_on_rank0():
            if rank == 0:
                raise ValueError("no room on the disk")
        try:  # rank 0's step raises: every rank stops at once, the others naming rank 0's error
            ddist.rank0_first(fails_on_rank0)
        except Exception as err:  # noqa: BLE001 - the type is what the test reads
            out["failed"] = f"{type(err).__name__}: {err}"
        try:  # rank 0 alone for longer than the timeout: the others fail instead of waiting for ever
            ddist.rank0_first(lambda: time.sleep(3 * timeout_minutes * 60) if rank == 0 else None)
            out["late"] = "passed"
        except RuntimeError as err:
            out["late"] = str(err)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_wait_share_and_gather_within_the_timeout(tmp_path):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_worker, args=(str(tmp_path), 0.005), nprocs=2, join=True,
                                          start_method=method)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["first"], r1["first"]) == (0, 1) and r0["at"] < r1["at"]  # rank 0 ran first, rank 1 after it
    assert r0["value"] == r1["value"] == "from 0"
    assert r0["gathered"] == r1["gathered"] == [{"rank": 0}, {"rank": 1}]
    assert r0["failed"] == "ValueError: no room on the disk"
    assert r1["failed"] == "DistillError: rank 0 stopped before this rank could go on (ValueError: no room on the disk)"
    assert "Timed out waiting 300ms" in r1["late"]  # rank 0 busy 0.9 s alone: rank 1 gave up after the timeout
