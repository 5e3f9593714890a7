"""Teacher-cache builds under torchrun on CPU (gloo): `torchrun --nproc_per_node=2 cache_child.py ROOT`, or `main(ROOT)`
in ranks forked with torchrun's environment (tests/forked_ranks.py, as tests/test_teacher_cache.py does).

Used by tests/test_teacher_cache.py. In ROOT, every rank builds (each build is one call of build_cache on
both ranks): two/ straight through; resumed/ twice, first with rank 1 stopped by an exception in its third
batch, then again to resume; partial/ with rank 1 stopped in its second batch, left unfinished; reuse/, a
cache the test finished with one process. Rank R writes what it saw to ROOT/result.rank<R>.json."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

from test_teacher_cache import BATCH, CountingTeacher, _teacher, cache_data

from distill.run.context import run_logger
from distill.utils.dist import barrier, init_distributed, rank
from teachers.cache import build_cache


def main(root: str) -> None:
    init_distributed()
    r = rank()
    data, inner = cache_data(), _teacher()
    out = {}

    def build(name, teacher, **kwargs):
        logs, error = [], None
        try:
            build_cache(teacher, data, os.path.join(root, name), batch_size=BATCH, progress=False,
                        logger=run_logger(logs.append), **kwargs)
        except (Exception, KeyboardInterrupt) as err:
            error = f"{type(err).__name__}: {err}"
        return {"images": teacher.images, "logs": logs, "error": error}

    out["two"] = build("two", CountingTeacher(inner))
    out["killed"] = build("resumed", CountingTeacher(inner, fail_after=2 if r == 1 else None), flush_every=1)
    barrier()
    out["after_kill"] = {f: json.load(open(os.path.join(root, "resumed", f)))
                         for f in sorted(os.listdir(os.path.join(root, "resumed"))) if f.endswith(".json")}
    barrier()
    out["resumed"] = build("resumed", CountingTeacher(inner))
    out["partial"] = build("partial", CountingTeacher(inner, fail_after=1 if r == 1 else None), flush_every=1)
    out["reuse"] = build("reuse", CountingTeacher(inner))
    with open(os.path.join(root, f"result.rank{r}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
