"""Runs one tiny distillation stage in a child process: `python engine_child.py OUT_DIR DELAY`.

Used by the resume tests to kill (SIGKILL) or preempt (SIGTERM) a real training process."""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
torch.set_num_threads(1)

from tiny import TinyFaces, tiny_config

import teachers
from distill.train.engine import Preempted, StageSpec, run_stage


def main(out_dir, delay):
    cfg = tiny_config(train={"max_steps": 12, "checkpoint_every": 2})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    torch.manual_seed(123)  # a random but identical teacher in every process (real runs load a checkpoint)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    try:
        run_stage(cfg, spec, out_dir, TinyFaces(delay=delay), {}, teacher=teacher, progress=False)
    except Preempted as err:
        print(err)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
