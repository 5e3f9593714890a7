"""Experiments as a whole: the driver of teacher -> baseline -> generations (`experiment`), the run directory's
rules (`rundir`: the same experiment only, restarting stages; `lock`: one writer), the dry run (`dry_run`), the
disk estimate (`disk`), the summary table (`summary`), reading runs side by side (`compare`), ablation grids
(`sweep`) and the pre-flight report (`doctor`). The teacher itself is prepared in `teachers/prepare.py`."""
