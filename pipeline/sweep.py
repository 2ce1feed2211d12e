"""``mid sweep``: the trials of a sweep file run on Ray Tune, one whole pipeline run per trial
(its MID stage one Ray Train run), every trial on the same store.

Sharing is the store's: every stage's output is content-addressed, and a stage being built
by one trial is waited for, then reused, by another (``RunContext.reuse_or_build``). So the
dataset, the models, each training pool attack and each stored test attack are built by
the first trial that needs them and reused by every other; the summary counts it.

A finished trial leaves ``OUT/trials/<variant>/trial.json`` (its config's digest and rows);
a rerun of the sweep reuses it and sends only the others to Ray Tune. A failed trial is
reported and the others go on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from pipeline import sweep_report
from pipeline.context import RunContext, run_ref_id
from pipeline.sweep_config import Sweep, describe_overrides
from storage import runs
from storage import store as store_location

TRIAL_FILE = "trial.json"
TRIAL_DRIVER_MEMORY = 256 << 20  # bytes Ray reserves for a trial's driver process


def trial_dir(out_dir: Path, variant: str) -> Path:
    return out_dir / "trials" / variant


def run_trial(params: dict[str, Any], configs: dict[str, Any], out_dir: str) -> None:
    """A Ray Tune trial: the whole pipeline for one variant (``configs`` holds every
    variant's config), inside a Tune worker (Ray is already up there, so its stages join it)."""
    from ray import tune

    from pipeline import driver
    from pipeline.config import RunConfig

    variant = params["variant"]
    cfg = RunConfig.model_validate(configs[variant])
    start = time.perf_counter()
    with RunContext(cfg, trial_dir(Path(out_dir), variant)) as ctx:
        ctx.label = f"trial {variant}: "  # its stage lines reach the sweep's console (pipeline.console)
        result = driver.run_stages(ctx)
    tune.report({"trial": json.dumps({"protocols": result["protocols"], "stages": result["stages"],
                                      "costs": result["costs"], "seconds": time.perf_counter() - start})})


def finished_trial(sweep: Sweep, out_dir: Path, variant: str) -> dict[str, Any] | None:
    """The record of a trial finished earlier with this very config, if any."""
    path = trial_dir(out_dir, variant) / TRIAL_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("digest") == sweep.digest(variant) and record.get("status") == "finished" else None


def stage_verbs(stages: dict[str, Any]) -> str:
    built = [s for s, r in stages.items() if not r["cache_hit"]]
    reused = [s for s, r in stages.items() if r["cache_hit"]]
    return f"built: {', '.join(built) or 'nothing'}; reused: {', '.join(reused) or 'nothing'}"


def write_finished(sweep: Sweep, out_dir: Path, variant: str, outcome: dict[str, Any]) -> None:
    """The record a rerun reuses; written as soon as the trial finishes, so an interrupted
    sweep keeps the trials it finished."""
    record = {"variant": variant, "digest": sweep.digest(variant), "status": "finished",
              "overrides": sweep.overrides[variant], **outcome}
    path = trial_dir(out_dir, variant) / TRIAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


class TuneThreadPark:
    """Ctrl-C of a sweep: Tune's controller thread is stopped in a safe place before Ray is.

    That thread calls into Ray's core worker every 0.1 s. One such call during or after
    ``ray.shutdown`` ends the whole process at once with status 1 ("The core worker has
    already been shutdown ... The process will exit"), before the sweep marks its trials
    interrupted or exits 130 (CI saw it once, in the Ctrl-C test). Tune's own
    graceful stop waits up to 10 s per trial actor, too slow for Ctrl-C; so at the end of
    its next step (``park_here``, from a Tune callback) the thread waits for ever, in Python,
    and the sweep shuts Ray down once it is parked. The thread is a daemon: it goes with
    the process."""

    WAIT_S = 5.0  # a Tune step takes ~0.1 s; past this, Ray is stopped anyway

    def __init__(self) -> None:
        self.requested, self.parked = threading.Event(), threading.Event()

    def __getstate__(self) -> dict:  # Tune pickles its callbacks into the experiment's state
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def park_here(self) -> None:
        if self.requested.is_set():
            self.parked.set()
            while True:  # asleep, not spinning: ``requested`` is set, so waiting on it returns at once
                time.sleep(3600)

    def park(self) -> None:
        self.requested.set()
        self.parked.wait(self.WAIT_S)


def _tune_callback(ctx: RunContext, sweep: Sweep, out_dir: Path, park: TuneThreadPark):
    """Stage-like console lines as trials start, finish and fail (Tune's own status tables
    go to the log with the rest of Ray's output); a finished trial's record; the place
    where Ctrl-C parks Tune's thread."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_step_end(self, iteration, trials, **info):
            park.park_here()

        def on_trial_start(self, iteration, trials, trial, **info):
            ctx.say(f"sweep: trial {trial.config['variant']} started "
                    f"({describe_overrides(sweep.overrides[trial.config['variant']])})")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            record = json.loads(result["trial"])
            write_finished(sweep, out_dir, trial.config["variant"], record)
            ctx.say(f"sweep: trial {trial.config['variant']} finished in {record['seconds']:.1f} s "
                    f"({stage_verbs(record['stages'])})")

        def on_trial_error(self, iteration, trials, trial, **info):
            ctx.say(f"sweep: trial {trial.config['variant']} failed; the other trials go on")

    return TrialLines()


def run_on_tune(ctx: RunContext, sweep: Sweep, variants: list[str], out_dir: Path) -> dict[str, Any]:
    """Run ``variants`` as Tune trials; returns {variant: result record or {"error": line}}."""
    # Tune's newer console reporter prints its status tables whatever the verbosity; the
    # older one is silent at verbose=0, and the sweep prints its own lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    from pipeline.console import quiet_driver_loggers
    from pipeline.errors import describe, one_line
    from pipeline.ray_runtime import fit_off_the_main_thread

    quiet_driver_loggers()  # Tune set up its loggers on import
    configs = {v: sweep.trials[v].model_dump(mode="json") for v in variants}
    trainable = tune.with_parameters(run_trial, configs=configs, out_dir=str(out_dir.resolve()))
    # A trial only directs: its stages ask Ray for their own actors and workers. Holding a
    # CPU for it would leave the pool actors of a 2-core laptop one CPU, so it asks for
    # memory alone (Tune refuses a request of nothing).
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    park = TuneThreadPark()
    tuner = tune.Tuner(trainable, param_space={"variant": tune.grid_search(variants)},
                       tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
                       run_config=tune.RunConfig(name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                                 storage_path=str((out_dir / "tune").resolve()), verbose=0,
                                                 callbacks=[_tune_callback(ctx, sweep, out_dir, park)],
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    grid = fit_off_the_main_thread(tuner, on_interrupt=park.park)
    outcomes: dict[str, Any] = {}
    for result in grid:
        variant = result.config["variant"]
        if result.error is not None:
            error = getattr(result.error, "cause", None) or result.error  # the trial's own exception
            outcomes[variant] = {"error": describe(error, ctx.cfg.store.url) or one_line(error)}
        else:
            outcomes[variant] = json.loads(result.metrics["trial"])
    return outcomes


def mark_interrupted(root: str, sweep: Sweep, variants: list[str]) -> None:
    """Ctrl-C of a sweep: the refs of its trials that were running say ``interrupted``.

    A trial's run closes its own ref, but Tune kills a running trial's actor rather than
    interrupting it. Ray is stopped first (a local instance whole; on a joined cluster this
    driver's trials with it), so no trial writes its ref again afterwards."""
    import ray

    ray.shutdown()
    for variant in variants:
        ref = run_ref_id(sweep.trials[variant])
        record = runs.read_refs(root).get(ref)
        if record is not None and record.get("status") == "running":
            runs.write_ref(root, ref, record.get("keys", {}), "interrupted", record.get("run_id"),
                           name=record.get("name"))


def run(sweep: Sweep, out_dir: Path, verbose: bool = False) -> int:
    """Every trial of ``sweep`` not finished before; the combined table; exit status 1 when
    a trial failed (the table still has the others)."""
    base = next(iter(sweep.trials.values()))
    ctx = RunContext(base, out_dir, verbose=verbose)  # for Ray and the console only: trials open the store
    reused = {v: r for v in sweep.trials if (r := finished_trial(sweep, out_dir, v)) is not None}
    pending = [v for v in sweep.trials if v not in reused]
    for variant in reused:
        ctx.say(f"sweep: trial {variant} reused (finished earlier with the same config: "
                f"{trial_dir(out_dir, variant) / TRIAL_FILE})")
    outcomes: dict[str, Any] = {}
    if pending:
        ctx.say(f"sweep: {len(pending)} trial(s) on Ray Tune, {sweep.max_concurrent_trials} at a time, on the store "
                f"{ctx.root}: the dataset, the models, the training pools and the stored test attacks are built by "
                f"the first trial that needs them and reused by the others")
        store_location.open_or_create(ctx.root)
        # Between two trials no trial's lease is live; the sweep's own keeps gc from removing
        # what the next trial would reuse.
        lease = runs.Lease(ctx.root, f"sweep {sweep.name}", on_wait=lambda: ctx.say(
            f"waiting: mid cache gc is cleaning the store {ctx.root}")).start()
        try:
            ctx.ensure_ray()
            outcomes = run_on_tune(ctx, sweep, pending, out_dir)
        except KeyboardInterrupt:
            mark_interrupted(ctx.root, sweep, pending)
            raise
        finally:
            lease.release()
    records = {v: reused.get(v) or outcomes.get(v) or {"error": "not run"} for v in sweep.trials}
    printed = sweep_report.write(out_dir, sweep, records, reused=set(reused))
    print(printed, flush=True)
    ctx.say(f"wrote {out_dir / 'sweep.md'}, sweep.json and the charts")
    return 1 if any("error" in r for r in records.values()) else 0
