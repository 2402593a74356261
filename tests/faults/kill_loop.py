"""kill -9 an experiment at random moments, rerun it each time, and compare the finished results
with an uninterrupted run's.

    python tests/faults/kill_loop.py JOB [--kills 20] [--seed 0] [--work DIR]

JOB is one of train_arithmetic, deepconf, critical_n, limit_eval, train_grpo (the RL loop), at a
tiny size. The job is started on one out_dir and killed (SIGKILL) after a delay drawn uniformly
from (0, the uninterrupted run's wall time, or the shortest whole run since), again and again,
each start resuming what the killed ones left. A start that is not killed must exit 0, having
finished the job: its results must then equal the uninterrupted run's (timings aside), and the
next start begins a fresh out_dir. This goes on until `--kills` kills have happened, and a last
start finishes the job. Not part of the test suite (minutes of wall time); prints one line of
figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Wall times, speeds, memory estimates and what one run (not the job) encoded.
TIMINGS = ("seconds", "offline_seconds", "seconds_saved", "peak_gib", "encoding",
           "rollout_seconds", "train_seconds", "seconds_this_run", "rollout_tokens_per_s",
           "train_tokens_per_s")

TINY_MODEL = ["terms=2", "fit.steps=60", "fit.batch_size=8", "length=40",
              "fit.optimizer.warmup_steps=5", "fit.optimizer.decay_steps=60", "hidden_size=32",
              "layers=1", "heads=2", "eval_problems=4", "fit.checkpoint_every=5"]


def job_args(job: str, work: pathlib.Path) -> list[str]:
    """The experiment script and its overrides (without out_dir)."""
    if job == "train_arithmetic":
        return ["train_arithmetic.py", *TINY_MODEL]
    model = work / "model"
    if job in ("deepconf", "train_grpo") and not (model / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "experiments" / "train_arithmetic.py"),
                        f"out_dir={model}", *TINY_MODEL], check=True, capture_output=True)
    if job == "train_grpo":
        return ["train_grpo.py", f"model={model}", "task.terms=2", "loop.steps=6",
                "loop.prompts=2", "loop.group_size=2", "loop.max_prompt_tokens=12",
                "loop.max_new_tokens=24", "loop.stop_ids=[1]", "loop.checkpoint_every=1"]
    if job == "deepconf":
        return ["deepconf.py", f"model={model}", f"task.path={model / 'problems.jsonl'}",
                "max_new_tokens=24", "group_size=4", "offline_traces=8", "ks=[4,8]", "warmup=4",
                "batch=4", "window=4"]
    if job == "critical_n":
        return ["critical_n.py", "d_min=2", "d_max=5", "start_n=3", "seeds=2", "window=2",
                "segment_steps=100", "solver.steps=2000", "solver.patience=300"]
    if job == "limit_eval":
        return ["limit_eval.py", "datasets=[{name: tiny, generate: {num_docs: 20, num_queries: "
                "30, k: 2, attributes_per_doc: 10}}]", "ks=[2,10]", "minilm_dims=[384,32]",
                "minilm_chunk=8", "free_dims=[6]", "solver.steps=3000"]
    raise SystemExit(f"unknown job {job!r}")


def start(args: list[str], out: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "experiments" / args[0]), *args[1:],
                             f"out_dir={out}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def results(out: pathlib.Path) -> dict:
    """What a finished run leaves that must not depend on interruptions: JSON and JSON Lines
    files without their timings, and every other file's bytes, except logs, plots and
    checkpoints (whose Orbax metadata holds times)."""
    found = {}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        if (not path.is_file() or name.startswith("checkpoints") or name == "config.yaml"
                or path.suffix in (".png", ".txt")):   # config.yaml differs in out_dir only
            continue
        if path.suffix == ".json":
            found[name] = _drop_timings(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            found[name] = [_drop_timings(json.loads(line))
                           for line in path.read_text().splitlines()]
        else:
            found[name] = path.read_bytes()
    return found


def _drop_timings(value):
    if isinstance(value, dict):
        return {k: _drop_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_drop_timings(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: /tmp/kill_JOB)")
    options = parser.parse_args()
    work = pathlib.Path(options.work or f"/tmp/kill_{options.job}")
    args = job_args(options.job, work)
    for name in ("whole", "killed"):
        shutil.rmtree(work / name, ignore_errors=True)
    began = time.perf_counter()
    whole = start(args, work / "whole")
    _, err = whole.communicate()
    assert whole.returncode == 0, err
    duration = time.perf_counter() - began
    rng = random.Random(options.seed)
    want = results(work / "whole")
    killed = finished = 0
    differ: set[str] = set()
    while True:
        out = work / "killed" / str(finished)
        fresh, began = not out.exists(), time.perf_counter()
        run = start(args, out)
        try:
            _, err = run.communicate(
                timeout=None if killed == options.kills else rng.uniform(0.05, 1.0) * duration)
        except subprocess.TimeoutExpired:
            run.kill()                                     # SIGKILL
            run.communicate()
            killed += 1
            continue
        assert run.returncode == 0, f"a rerun failed after a kill:\n{err[-3000:]}"
        if fresh:  # the machine got faster: kill within the run's new duration
            duration = min(duration, time.perf_counter() - began)
        got = results(out)
        differ |= {k for k in want.keys() | got.keys() if want.get(k) != got.get(k)}
        finished += 1
        if killed == options.kills:
            break
    print(f"{options.job}: uninterrupted run {duration:.1f} s; {killed} kill -9 in "
          f"{finished} interrupted jobs, each finished by a rerun (exit 0); {len(want)} result "
          f"files compared with the uninterrupted run's: "
          + ("all equal" if not differ else f"DIFFER: {sorted(differ)}"))
    sys.exit(1 if differ else 0)

if __name__ == "__main__":
    main()
