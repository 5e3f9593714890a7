"""The thread policy: how many threads torch may use in this process, decided in one place.

The cores a process may use are the CPUs of its affinity mask (`os.sched_getaffinity`: taskset, a cluster
scheduler's cpuset) capped by its cgroup's CPU quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
`cpu.cfs_period_us`: a container's `--cpus`). A process and its DataLoader workers together never ask for more
threads than those cores: each worker computes on one thread (torch sets one in every worker), so the process
itself gets `cores - workers` threads, at least one, and fewer when other processes keep cores busy (measured
over a fifth of a second when the stage or command starts: `busy_cores`). Workers are capped at `cores - 1`,
so the computing process keeps a core; torchrun's processes on one machine (LOCAL_WORLD_SIZE) share its cores
equally. `train.threads` (an experiment), `--threads` (a command) or
OMP_NUM_THREADS in the environment override the count.

Why: beside another busy process, a thread more than the free cores makes a training step several times
slower, because every OpenMP barrier waits for a thread the OS has descheduled; on a quiet machine each
thread still pays. OpenMP's wait policy is left as it is: OMP_WAIT_POLICY=PASSIVE made the quiet step slower
and did not rescue the loaded one (the figures: docs/measurements.md, benchmarks/bench_cpu.py). The count is
part of what determines a run's digits: a stage records it (result.json, last.pt) and resumes with the count it
started with.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from distill.utils.errors import ConfigError


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this process's cgroup may use (quota / period), or None when unlimited or unknown."""
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota = _read(os.path.join(root, "cpu", "cpu.cfs_quota_us"))
    period = _read(os.path.join(root, "cpu", "cpu.cfs_period_us"))
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def available_cores(affinity=None, quota=None) -> int:
    """The cores this process may use: its affinity mask, capped by the cgroup quota (rounded up, at least 1)."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = max(1, len(affinity))
    quota = cgroup_cpu_limit() if quota is None else quota
    if quota:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


PF_KTHREAD = 0x00200000  # /proc/<pid>/stat's flags bit of a kernel thread (Linux)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is no /proc (not Linux). Busy is
    user + nice + system time: interrupts and steal are nobody's threads."""
    line = _read("/proc/stat")
    if not line:
        return None
    fields = [int(v) for v in line.splitlines()[0].split()[1:]]
    return sum(fields[:3]), sum(fields[:8])


def _own_jiffies(proc: str = "/proc") -> int:
    """CPU ticks used so far by this process and its descendants (loader workers, W&B's service), and by the
    kernel's own threads (the writeback of files this process just wrote, say): none of it is a competitor."""
    parents, ticks, kernel = {}, {}, set()
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        stat = _read(f"{proc}/{entry}/stat")
        if not stat:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid ... utime(12) stime(13)
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
        if int(fields[6]) & PF_KTHREAD:
            kernel.add(int(entry))
    me, own = os.getpid(), 0
    for pid in ticks:
        if pid in kernel:
            own += ticks[pid]
            continue
        p, seen = pid, 0
        while p not in (0, 1, me) and p in parents and seen < 64:
            p, seen = parents[p], seen + 1
        own += ticks[pid] if p == me or pid == me else 0
    return own


def busy_cores(window: float = 0.2) -> float:
    """How many cores other processes kept busy over the last `window` seconds: all CPUs' user and system time
    less that of this process, its descendants and kernel threads (Linux /proc; 0 elsewhere). Read from
    /proc/stat's totals, so processes this PID namespace cannot list (other containers on the host) count."""
    import time

    first = _cpu_jiffies()
    if first is None:
        return 0.0
    own = _own_jiffies()
    time.sleep(window)
    second, own_after = _cpu_jiffies(), _own_jiffies()
    busy, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return 0.0
    return max(0.0, (busy - (own_after - own)) / (total / (os.cpu_count() or 1)))


@dataclass(frozen=True)
class ThreadPlan:
    threads: int        # torch's intra-op threads in this process
    cores: int          # the cores it may use
    workers: int        # DataLoader worker processes beside it (one thread each)
    source: str         # "policy" or the key that overrode it (train.threads, --threads)

    busy: float = 0.0   # cores other processes kept busy when it was planned
    asked_workers: int = 0  # the workers asked for (more than `workers` when capped)

    def describe(self) -> str:
        parts = [f"{self.cores} core{'s' if self.cores != 1 else ''}"]
        if self.busy >= 0.5:
            parts.append(f"{self.busy:.1f} busy with other processes")
        if self.workers or self.asked_workers:
            parts.append(f"{self.workers} loader worker{'s' if self.workers != 1 else ''}"
                         + (f" of the {self.asked_workers} asked for" if self.asked_workers != self.workers else ""))
        how = f"set by {self.source}" if self.source != "policy" else ", ".join(parts)
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({how})"


GPU_WORKERS = 2  # data.num_workers: null on a GPU (README "The data path": ~1 core per 2,000 img/s)


def loader_workers(num_workers: int | None, device_type: str) -> int:
    """`data.num_workers` as set, or its default for the device: 0 on a CPU, where every worker takes a core
    the training process would use (on 2 cores the quickstart's student trains faster with 0 workers and 2
    threads than with 1 worker and 1 thread: docs/measurements.md), GPU_WORKERS on a GPU, which waits for them."""
    if num_workers is not None:
        return int(num_workers)
    return GPU_WORKERS if device_type == "cuda" else 0


THREADS_PER_CORE = 4  # the most threads a count may ask per core of the machine: more only waits and costs memory


def max_threads() -> int:
    """The largest thread count `train.threads`, `--threads` or OMP_NUM_THREADS may set: the machine's cores
    (os.cpu_count(), not this process's share: a count is an explicit choice) × THREADS_PER_CORE. Each thread
    holds its own stack and buffers, so a count far past the cores runs the machine out of memory before it
    computes anything."""
    return (os.cpu_count() or 1) * THREADS_PER_CORE


def check_thread_count(override, key: str) -> None:
    """Refuse a thread count below 1 or above max_threads(), naming `key` (a config key, a flag, an environment
    variable) and the bound."""
    if int(override) < 1:
        raise ConfigError(f"{key} {override}: must be at least 1 (or leave it unset for the thread policy)")
    if int(override) > max_threads():
        raise ConfigError(f"{key} {override}: at most {max_threads():,} ({os.cpu_count() or 1} cores × "
                          f"{THREADS_PER_CORE}); a thread past the cores only waits, and each costs memory: lower it, "
                          f"or leave it unset for the thread policy")


def plan_threads(workers: int = 0, override: int | None = None, key: str = "train.threads",
                 cores: int | None = None, busy: float | None = None, environ=None) -> ThreadPlan:
    """The thread count for a process that runs `workers` loader workers beside it, and the workers it may run
    (at most cores - 1). `override` (from `key`), else OMP_NUM_THREADS in `environ`, wins over the policy; an
    override below 1 or above max_threads() is a ConfigError naming the key. `busy`: cores used by others
    (default: measured)."""
    if cores is None:  # torchrun's processes on this machine share its cores
        cores = max(1, available_cores() // max(1, int((environ or os.environ).get("LOCAL_WORLD_SIZE", 1) or 1)))
    asked = max(0, int(workers or 0))
    workers = min(asked, cores - 1) if cores > 1 else 0
    environ = os.environ if environ is None else environ
    if override is None and str(environ.get("OMP_NUM_THREADS", "")).isdigit():
        override, key = int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if override is not None:
        check_thread_count(override, key)
        return ThreadPlan(int(override), cores, workers, key, 0.0, asked)
    busy = busy_cores() if busy is None else busy
    return ThreadPlan(max(1, cores - workers - int(round(busy))), cores, workers, "policy", busy, asked)


def apply_threads(plan: ThreadPlan) -> ThreadPlan:
    """Set torch's intra-op thread count to the plan's."""
    import torch

    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    return plan
