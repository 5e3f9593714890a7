"""What runs around every stage of a run plan (distill/run/plan.py), beside the stage's own work:

    tracking    the stage's metrics: its metrics.jsonl, mirrored to W&B (distill/train/tracking.py); the engine
                logs a training stage's steps to it, a loaded teacher logs its evaluation
    ijb         a finished stage evaluated once on data.ijb, on the run's device (under torchrun each rank embeds
                its share of the images): the numbers go into its result.json (`ijb`) and its W&B run
                (`ijb/<target>/...`), written by rank 0

`StageHooks(cfg, ctx, ijb_meta)` holds both; `tracker(name, generation, init_from)` opens a stage's tracker and
`after(stage, result, load_model, shared)` runs the hooks the plan lists for a finished stage.
"""

from __future__ import annotations

from distill.eval.far import SUMMARY_IJB_FARS, far_key
from distill.eval.ijb_stage import evaluate_ijb, ijb_scalars, needs_ijb
from distill.run.context import RunContext
from distill.run.plan import IJB
from distill.run.shared_teacher import cached_metrics, ijb_files, keep_metrics
from distill.train.tracking import stage_tracker
from distill.utils.atomic import atomic_write_json
from distill.utils.dist import from_rank0
from distill.utils.threads import loader_workers


class StageHooks:
    def __init__(self, cfg, ctx: RunContext, ijb_meta=None):
        self.cfg, self.ctx, self.ijb_meta = cfg, ctx, ijb_meta

    def tracker(self, name: str, generation: int, init_from: str | None):
        """The tracking hook: the tracker of one stage (metrics.jsonl; W&B on rank 0 unless disabled)."""
        return stage_tracker(self.cfg, self.ctx.run_dir, name, generation, init_from)

    def after(self, stage, result: dict, load_model, shared: str | None = None) -> dict:
        """The hooks the plan gives a finished stage (`stage.hooks`) that follow it: the IJB evaluation (data.ijb).
        `load_model() -> (model, input_size)`; `shared`: the teacher's teacher.shared_cache folder, where an
        earlier run may have kept its IJB result."""
        if IJB not in stage.hooks or self.ijb_meta is None:
            return result
        return self.ijb(result, load_model, shared)

    def ijb(self, result: dict, load_model, shared: str | None = None) -> dict:
        """The IJB hook, on every rank: the model loaded by each rank and moved to the run's device, each rank of a
        torchrun job embedding its share of the images (distill/eval/ijb_stage.py); rank 0 writes the result and
        every rank gets it."""
        cfg, ctx, meta = self.cfg, self.ctx, self.ijb_meta
        if not from_rank0(needs_ijb(result, cfg.data.ijb)):
            return result
        name = result["stage"]
        files = ijb_files(cfg.data.ijb) if shared and ctx.is_main else {}
        ijb = from_rank0((cached_metrics(shared, files) or {}).get("ijb") if shared and ctx.is_main else None)
        if ijb is None:
            model, input_size = load_model()
            ctx.log.info(f"{name}: {cfg.data.ijb.target} template verification ({len(meta.names):,} images, "
                         f"{len(meta.pairs):,} pairs)")
            ijb = evaluate_ijb(model.to(ctx.device), input_size, cfg.data.ijb, meta, progress=ctx.progress,
                               workers=loader_workers(cfg.data.num_workers, ctx.device.type), model_name=name,
                               device=ctx.device)
            if shared and ctx.is_main:
                keep_metrics(shared, files, {"ijb": ijb})
        result = {**result, "ijb": ijb}
        if ctx.is_main:
            atomic_write_json(ctx.layout.stage(name).result, result)
            tracker = self.tracker(name, result.get("generation", 0), result.get("init_from"))
            tracker.log(ijb_scalars(ijb), int(result.get("steps") or 0))
            tracker.finish(None, None)
            tars = ", ".join(f"TAR@FAR={far_key(f)} {100 * ijb['tar_at_far'][far_key(f)]:.2f}%"
                             for f in SUMMARY_IJB_FARS)
            ctx.log.info(f"{name}: {cfg.data.ijb.target} {tars}, AUC {ijb['auc']:.4f}")
        return from_rank0(result)
