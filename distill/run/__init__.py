"""Experiments as a whole: the run plan (`plan`: the stages of an experiment in execution order), the driver that
executes it (`experiment`; the teacher's stages in `teacher_stage`, the per-stage tracking and IJB hooks in
`hooks`), the run context every step gets (`context`: rank, world size, device, run directory, logger), the run
directory's rules (`rundir`: the same experiment only, restarting stages; `lock`: one writer), the dry run
(`dry_run`), the inputs opened whole and checked before any work (`inputs`, with `preflight`'s
checks), the disk estimate (`disk`), the summary table (`summary`),
reading runs side by side (`compare`), ablation grids (`sweep`), a teacher shared by many runs (`shared_teacher`)
and the pre-flight report (`doctor`). What makes a model a teacher (which one a run uses, its identity, its cache)
is in teachers/."""
