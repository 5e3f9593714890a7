"""Metrics of a stage: always a local `metrics.jsonl`, mirrored to Weights & Biases unless W&B is disabled.

One JSON object per line: {"step": int, "time": unix seconds, <metric>: value, ...}, with metric names
`train/<term>` (every loss term by name, lr, images_per_s) and `val/<set>/<metric>`. `distill compare`
reads these files, so comparing runs never needs W&B.

W&B, one run per stage (teacher, baseline, gen<k>) of an experiment:

- group: `<experiment name>-<8 hex digits>`, the digits a hash of the run directory's absolute path,
  kept in `<run dir>/wandb_group.txt` so reruns (and moved directories) stay in one group while two
  experiments of the same name in different directories do not mix; job_type: the stage name;
  name: `<experiment>/<stage>`; config: the resolved config plus stage, generation, init_from, run_dir
  and input_artifacts.
- Resume: the run id is kept in `<stage dir>/wandb_run_id.txt` and the run is opened with
  resume='allow', so an interrupted stage continues the same W&B run (W&B keeps the steps it already
  has; steps between the checkpoint and the interruption are logged again only locally).
- Lineage: a finished stage logs its student.pt as a `model` artifact (its name is kept in
  `<stage dir>/wandb_artifact.txt`); a stage whose init_from (or, when it distils, whose teacher)
  has such an artifact declares it with `use_artifact`. W&B refuses `use_artifact` in offline mode:
  offline, the lineage lives in the config (`init_from`, `input_artifacts`); `wandb sync` of the
  offline runs still uploads every artifact.
- Mode: the environment variable WANDB_MODE when set (online / offline / disabled; so a cluster or CI
  can force it), else `tracking.wandb` from the config. `auto` is online when W&B credentials are
  configured (WANDB_API_KEY, or a ~/.netrc entry for the W&B host) and offline otherwise. `disabled`
  never imports wandb. Files go to `<run dir>/wandb/`. No API key is ever read into or written to a
  config, log or file by this module.
- Under a W&B sweep agent (WANDB_SWEEP_ID set) the experiment's last stage is the sweep's trial run;
  the other stages are ordinary runs of the same group.
- Only rank 0 logs. A W&B failure (init, log, artifact, finish) never stops training: it warns once
  (TrackingWarning) and the stage continues with the local log only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import netrc
import os
import re
import secrets
import time
import warnings
from urllib.parse import urlsplit

from timm.utils import AverageMeter

from distill.config.schema import WANDB_MODES, to_dict
from distill.eval.far import VERIFICATION_FARS, far_key, normalise_far_keys
from distill.eval.verification import VAL_FAR, set_name_of
from distill.utils.atomic import WriteError, atomic_write_text
from distill.utils.dist import rank as dist_rank
from distill.utils.errors import ConfigError
from distill.utils.layout import BASELINE, TEACHER, RunLayout, StageLayout, generation_name

_SWEEP_ENV = ("WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_RUN_ID")


class TrackingWarning(UserWarning):
    """W&B failed; the stage goes on with its local metrics.jsonl."""


class Tracker:
    """Local metrics log of one stage (rank 0 only writes)."""

    def __init__(self, stage_dir: str, rank: int = 0):
        self.path = StageLayout(stage_dir).metrics
        self.rank = rank

    def log(self, metrics: dict, step: int) -> None:
        """Append one line. A failed append (a full disk) cuts the file back to its previous end, so no half line
        is left, and raises a WriteError naming the file."""
        if self.rank != 0 or not metrics:
            return
        line = json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n"
        end = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as err:
            with contextlib.suppress(OSError):  # shortening a file needs no free space
                os.truncate(self.path, end)
            err.filename = self.path  # the file a full disk stopped (distill.utils.atomic.full_disk)
            raise WriteError(f"{self.path}: could not add the metrics of step {step} ({err.strerror or err}); the "
                             f"lines before it are intact. Free disk space there and rerun the same command: the "
                             f"stage resumes from its last checkpoint") from None

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches the resumed run, and a torn last line
        (a kill mid-append); a whole last line whose newline never reached the disk gets it back."""
        if self.rank != 0 or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = [line if line.endswith("\n") else line + "\n" for line in lines if _step_of(line) <= step]
        if kept != lines:
            atomic_write_text(self.path, "".join(kept))

    def finish(self, result: dict | None = None, student_path: str | None = None) -> None:
        """The stage ended: `result` is its result.json content, `student_path` its student.pt."""


class LogWindow:
    """The train/* scalars of the next log line: each term's mean over every micro-batch since the previous
    line (timm AverageMeter weighted by batch size; the values stay detached tensors, so the device is
    synced once per line, not per micro-batch) and images/s over the same micro-batches, time spent
    evaluating or checkpointing left out."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.meters: dict[str, AverageMeter] = {}
        self.images, self.excluded, self.start = 0, 0.0, time.perf_counter()

    def add(self, logs: dict, batch_size: int, images: int) -> None:
        for name, value in logs.items():
            self.meters.setdefault(name, AverageMeter()).update(value, batch_size)
        self.images += images

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def read(self) -> tuple[dict, float]:
        """({term: window mean}, images per second); a new window starts."""
        means = {name: float(meter.avg) for name, meter in self.meters.items()}  # waits for the device
        seconds = time.perf_counter() - self.start - self.excluded
        rate = self.images / max(seconds, 1e-9)
        self.reset()
        return means, rate


# ------------------------------------------------------------------------------------------ W&B

_OPEN: list = []  # W&B trackers whose run is open (a crashed stage never reaches finish())


class WandbTracker(Tracker):
    """The local log plus one W&B run. Every W&B call is guarded: a failure disables W&B, not training."""

    def __init__(self, stage_dir: str, init: dict, inputs: list, artifact: dict, sweep_trial: bool,
                 metric_names: list):
        super().__init__(stage_dir, rank=0)
        self.stage_dir, self.artifact, self.run, self.failed = stage_dir, artifact, None, False
        self.run_id = init["id"]
        for stale in [t for t in _OPEN if t.run_id == self.run_id]:
            stale.close(exit_code=1)  # this stage raised earlier in this process: W&B still holds its id
        try:
            import wandb
            os.makedirs(init["dir"], exist_ok=True)
            if any(n in os.environ for n in _SWEEP_ENV):
                # wandb freezes its settings from the environment at setup: without the agent's variables,
                # or it would ignore our run ids and put every stage into the one trial run. The trial
                # stage names its sweep explicitly instead.
                with _without_env(_SWEEP_ENV):
                    wandb.setup()
            settings = wandb.Settings(sweep_id=os.environ["WANDB_SWEEP_ID"]) if sweep_trial else None
            self.run = wandb.init(**init, settings=settings, resume="allow", reinit="create_new")
            _OPEN.append(self)
            self.run.define_metric("train/*", summary="last")
            self.run.define_metric("val/*", summary="last")
            for name in metric_names:  # accuracy and TAR: the best value matters as much as the last
                self.run.define_metric(name, summary="max,last")
        except Exception as err:  # noqa: BLE001 - nothing W&B does may stop training
            self._fail("starting the W&B run", err)
            return
        if not self.run.offline:  # W&B refuses use_artifact offline; there config.input_artifacts keeps it
            for name in inputs:
                try:
                    self.run.use_artifact(f"{name}:latest", type="model")
                except Exception as err:  # noqa: BLE001 - e.g. an input logged offline and never synced
                    warnings.warn(f"W&B: input artifact {name} not found ({type(err).__name__}: {err}); the run "
                                  f"goes on, its lineage is in config.init_from", TrackingWarning, stacklevel=2)

    def _fail(self, what: str, err: Exception, exit_code: int = 1) -> None:
        if not self.failed:
            warnings.warn(f"W&B tracking failed while {what} ({type(err).__name__}: {err}); training continues, "
                          f"metrics go to {self.path} only", TrackingWarning, stacklevel=3)
        self.failed = True
        self.close(exit_code=exit_code)

    def close(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if self in _OPEN:
            _OPEN.remove(self)
        if run is not None:
            with contextlib.suppress(Exception):
                run.finish(exit_code=exit_code)

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        if self.run is not None and metrics:
            try:
                self.run.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001 - a failed W&B log is reported, training goes on
                self._fail(f"logging step {step}", err)

    def finish(self, result: dict | None = None, student_path: str | None = None) -> None:
        super().finish(result, student_path)
        if self.run is None:
            return
        try:
            import wandb
            if result:
                self.run.summary.update({"train_seconds": result.get("train_seconds"), "steps": result.get("steps"),
                                         "best_step": (result.get("best") or {}).get("step")})
                model = {"arch": result.get("arch"), "params": result.get("params"), "gflops": result.get("gflops")}
                self.run.summary.update({f"model/{k}": v for k, v in model.items() if v is not None})
            if student_path and os.path.exists(student_path):
                meta = {**self.artifact["metadata"]}
                if result:
                    meta.update(arch=result.get("arch"), model_kwargs=result.get("model_kwargs"),
                                metrics=_plain_metrics(result.get("metrics") or {}))
                art = wandb.Artifact(self.artifact["name"], type="model", metadata=meta,
                                     description=f"student.pt of stage {meta['stage']} ({student_path})")
                art.add_file(student_path, name=os.path.basename(student_path))
                self.run.log_artifact(art, aliases=["latest", meta["stage"]])
                atomic_write_text(StageLayout(self.stage_dir).wandb_artifact, self.artifact["name"] + "\n")
        except Exception as err:  # noqa: BLE001 - a failed artifact upload is reported, the stage still finishes
            self._fail("logging the student artifact", err, exit_code=0)  # the stage itself succeeded
            return
        self.close(exit_code=0)


def close_open_runs(exit_code: int = 1) -> None:
    """Finish W&B runs of stages that raised (an in-process sweep goes on to its next point)."""
    for tracker in list(_OPEN):
        tracker.close(exit_code)


# ------------------------------------------------------------------------------------------ choices

def has_wandb_credentials(environ=os.environ) -> bool:
    """Whether W&B credentials are configured: WANDB_API_KEY, or a netrc entry for the W&B host.

    Only the presence of an entry is checked; the key itself is never read into our code."""
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    paths = [environ["NETRC"]] if environ.get("NETRC") else [os.path.expanduser("~/.netrc"),
                                                              os.path.expanduser("~/_netrc")]
    for path in paths:
        try:
            if os.path.isfile(path) and netrc.netrc(path).authenticators(host):
                return True
        except (netrc.NetrcParseError, OSError):
            continue
    return False


def resolve_mode(setting: str, environ=os.environ) -> str:
    """online / offline / disabled from `tracking.wandb` and the environment (WANDB_MODE wins when set)."""
    env = environ.get("WANDB_MODE", "").strip().lower()
    if environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        env = "disabled"
    mode = {"dryrun": "offline", "run": "online"}.get(env, env) or setting
    if mode not in WANDB_MODES:
        where = f"environment variable WANDB_MODE={env!r}" if env else f"tracking.wandb: {setting!r}"
        raise ConfigError(f"{where} is not a W&B mode; use one of {', '.join(WANDB_MODES)}")
    if mode == "auto":
        mode = "online" if has_wandb_credentials(environ) else "offline"
    return mode


def group_id(run_dir: str) -> str:
    """8 hex digits naming a run directory, made once and kept in run_dir/wandb_group.txt."""
    path = RunLayout(run_dir).wandb_group
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = f.read().strip()
        if re.fullmatch(r"[0-9a-f]{8}", kept):
            return kept
    digest = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    atomic_write_text(path, digest + "\n")
    return digest


def _stage_run_id(stage_dir: str, group: str, stage: str, sweep_trial: bool) -> str:
    """The stage's W&B run id, kept in stage_dir/wandb_run_id.txt so a resumed stage continues its run."""
    path = StageLayout(stage_dir).wandb_run_id
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = f.read().strip()
        if kept:
            return kept
    # A fresh random part: a deleted and recreated run directory must not append to its old W&B runs.
    run_id = os.environ["WANDB_RUN_ID"] if sweep_trial else f"{group}-{stage}-{secrets.token_hex(3)}"
    atomic_write_text(path, run_id + "\n")
    return run_id


def _last_stage(cfg) -> str:
    return generation_name(cfg.generations) if cfg.generations > 0 else (BASELINE if cfg.baseline else TEACHER)


def _input_artifacts(cfg, run_dir: str, generation: int, init_from: str | None) -> list:
    """Artifacts this stage starts from: its init_from's stage, and the teacher trained here when it distils."""
    dirs = [os.path.dirname(os.path.abspath(init_from))] if init_from else []
    born_again = cfg.recursive.teacher == "previous" and generation > 1  # its teacher is init_from's stage
    if generation > 0 and cfg.teacher is not None and cfg.distill.weight > 0 and not born_again:
        dirs.append(RunLayout(run_dir).teacher.dir)
    names = []
    for d in dirs:
        path = StageLayout(d).wandb_artifact
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                names.append(f.read().strip())
    return [n for n in names if n]


def val_scalars(metrics: dict) -> dict:
    """{set: verification_metrics} -> the flat `val/<set>/<metric>` scalars every tracker logs."""
    flat = {}
    for name, m in metrics.items():
        flat[f"val/{name}/acc"] = m["acc_mean"]
        flat[f"val/{name}/acc_std"] = m["acc_std"]
        flat[f"val/{name}/xnorm"] = m["xnorm"]
        for far, t in normalise_far_keys(m["tar_at_far"]).items():
            if t and t.get("tar") is not None:
                flat[f"val/{name}/tar_at_far_{far}"] = t["tar"]
        if m.get("insightface_val"):  # insightface's own 10-fold VAL@FAR=1e-3, as in its logs
            flat[f"val/{name}/insightface_val_at_far_{far_key(VAL_FAR)}"] = m["insightface_val"]["val_mean"]
    return flat


def stage_tracker(cfg, run_dir: str, stage: str, generation: int, init_from: str | None) -> Tracker:
    """The tracker of one stage of an experiment (the generations driver calls this for every stage)."""
    stage_dir = RunLayout(run_dir).stage(stage).dir  # W&B writes its own files under run_dir/wandb/
    rank = dist_rank()  # the driver does not pass it, and every rank builds its trackers
    mode = resolve_mode(cfg.tracking.wandb)
    if rank != 0 or mode == "disabled":
        return Tracker(stage_dir, rank=rank)

    try:
        os.makedirs(stage_dir, exist_ok=True)
        digits = group_id(run_dir)
        group = f"{cfg.name[:110]}-{digits}"  # W&B allows 128 characters
        sweep_trial = bool(os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID")) \
            and stage == _last_stage(cfg)
        run_id = _stage_run_id(stage_dir, digits, stage, sweep_trial)
    except OSError as err:
        warnings.warn(f"W&B tracking is off for {stage}: cannot write its ids under {run_dir} ({err}); metrics go "
                      f"to {StageLayout(stage_dir).metrics} only", TrackingWarning, stacklevel=2)
        return Tracker(stage_dir, rank=rank)
    inputs = _input_artifacts(cfg, run_dir, generation, init_from)
    config = {**to_dict(cfg), "stage": stage, "generation": generation, "init_from": init_from,
              "run_dir": os.path.abspath(run_dir), "input_artifacts": inputs}
    init = dict(project=cfg.tracking.project, entity=cfg.tracking.entity, group=group, job_type=stage,
                name=f"{cfg.name}/{stage}", id=run_id, config=config, dir=os.path.abspath(run_dir), mode=mode)
    sets = [set_name_of(p) for p in cfg.data.val]
    names = [f"val/{s}/acc" for s in sets] + [f"val/{s}/tar_at_far_{far_key(far)}"
                                               for s in sets for far in VERIFICATION_FARS]
    artifact = {"name": _artifact_name(f"student-{group}-{stage}"),
                "metadata": {"experiment": cfg.name, "stage": stage, "generation": generation,
                             "init_from": init_from, "run_dir": os.path.abspath(run_dir)}}
    return WandbTracker(stage_dir, init, inputs, artifact, sweep_trial, names)


# ------------------------------------------------------------------------------------------ helpers

@contextlib.contextmanager
def _without_env(names):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:128]


def _plain_metrics(metrics: dict) -> dict:
    return {name: {"acc": m.get("acc_mean"), "acc_std": m.get("acc_std"),
                   **{f"tar_at_far_{far}": (t or {}).get("tar")
                      for far, t in normalise_far_keys(m.get("tar_at_far") or {}).items()}}
            for name, m in metrics.items()}


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:  # a torn last line from a kill: drop it
        return 1 << 62


def read_metrics(stage_dir: str) -> list:
    path = StageLayout(stage_dir).metrics
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out
