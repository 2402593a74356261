"""DeepConf offline and online on a local Hugging Face checkpoint and a task's held-out problems.

    python experiments/deepconf.py --config configs/deepconf/cpu.yaml [key=value ...]
    python experiments/deepconf.py --config configs/deepconf/paper_gpu.yaml model=DIR task.path=FILE

`task` is the `task` section of the RL configs (`jaxlab.tasks.TaskConfig`, kind=math), so one
problem file serves GRPO training and this evaluation: a JSON Lines, parquet or `datasets` file
whose fields `task.problem_field`, `task.answer_field` (a GSM8K answer ending `#### 72` is read
as 72) and `task.id_field` say where each problem's text, reference and id are. DeepConf
evaluates the task's held-out problems (`tasks.load_splits`): a file of test problems with
`task.eval_fraction: 1.0` (every row), or `task.eval_path`; the first `task.eval_limit` of them
(0: all). Prompts are the task's (`tasks.encode_prompts`: chat template, system prompt,
instruction); a prompt longer than `max_prompt_tokens` (when > 0) stops the run naming its row,
or is left out (`task.long_prompts`). Traces end at the checkpoint's stop tokens
(`tasks.stop_ids`). A trace's answer is its last `\\boxed{}` (`answers.boxed_answer`, the
paper's extraction; no last-number fallback as in the task's reward), right when
`answers.is_correct` (math-verify) finds it equal to the reference; `task.rewards` is not used.

Per problem: `offline_traces` traces decoded to the end, scored by every voting method for each K
of `ks` (the first K traces); then DeepConf online for each rule, with the same budget. Writes to
`out_dir`: problems.jsonl (one record per problem, appended as each finishes; a rerun resumes,
also with a larger `task.eval_limit`), traces/ (the offline traces as zarr arrays, row p for the
held-out problem p (from 0, before `task.eval_limit`), one chunk per problem written before its
record; see `trace_specs` and jaxlab/arrays.py), summary.json, accuracy_vs_tokens.png, log.txt,
config.yaml, inputs.json, and prints a summary table.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import ClassVar

import jax
import numpy as np
from tqdm import tqdm

from jaxlab import arrays, cli, jsonl, results, tasks
from jaxlab import config as config_lib
from jaxlab.deepconf import answers, online, plots, voting
from jaxlab.models import hf
from jaxlab.sampling import sampler
from jaxlab.sampling.sampler import SamplingConfig

log = logging.getLogger("jaxlab")

# Offline methods: (name, trace metric used as vote weight or None, metric to filter by,
# keep_percent). Filtered votes are confidence-weighted by the same metric.
OFFLINE = (
    ("majority", None, None, 100.0),
    ("weighted-mean", "mean", None, 100.0),
    ("lowest-group@90", "lowest_group", "lowest_group", 90.0),
    ("lowest-group@10", "lowest_group", "lowest_group", 10.0),
    ("bottom-10%@10", "bottom_group", "bottom_group", 10.0),
    ("tail@90", "tail", "tail", 90.0),
    ("tail@10", "tail", "tail", 10.0),
)

# The test problems that experiments/train_arithmetic.py writes beside the arithmetic model
# ({"id", "prompt", "answer"}; its character tokenizer has no chat template).
ARITHMETIC_TEST = tasks.TaskConfig(path="results/arithmetic_model/problems.jsonl",
                                   problem_field="prompt", id_field="id", eval_fraction=1.0,
                                   chat_template=False)


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/deepconf"
    model: str = "results/arithmetic_model"              # local Hugging Face folder
    param_dtype: str = "float32"                         # weights, and activations computed in
    #                                                      it (bfloat16: a checkpoint's usual
    #                                                      dtype on GPU)
    task: tasks.TaskConfig = dataclasses.field(default_factory=lambda: ARITHMETIC_TEST)
    #                                                      kind=math; its held-out problems are
    #                                                      evaluated (task.eval_limit: the first
    #                                                      N, may grow on a rerun)
    max_prompt_tokens: int = 0                           # longer prompts: task.long_prompts
    #                                                      (0: any length)
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    window: int = 8                                      # group confidence window (tokens)
    tail: int = 2048                                     # tail confidence: last `tail` tokens
    confidence_k: int = 20
    group_size: int = 16                                 # traces decoded at once per problem
    kv_pages: int | None = None                          # generated KV in a pool of pages
    #                                                      (SamplingConfig.kv_pages; None:
    #                                                      max_new_tokens per slot)
    decode_kernel: str = "auto"                          # SamplingConfig.decode_kernel
    scan_layers: bool = False                            # SamplingConfig.scan_layers
    offline_traces: int = 64
    ks: tuple[int, ...] = (8, 16, 32, 64)
    rules: tuple[str, ...] = ("deepconf-low", "deepconf-high")
    warmup: int = 16
    batch: int = 32
    consensus: float = 0.95
    online_at_once: bool = False                         # online DeepConf on every problem still
    #                                                      to do in one `online.solve_many` per
    #                                                      rule (same records, floats to
    #                                                      rounding; seconds per problem = the
    #                                                      batch's time / problems)

    # The keys of earlier versions of this config, refused with their new names.
    RENAMED: ClassVar[dict[str, str]] = {"dtype": "param_dtype", "slots": "group_size",
                                         "problems": "task.path",
                                         "chat_template": "task.chat_template",
                                         "limit": "task.eval_limit"}

    def __post_init__(self):
        config_lib.require_positive_ints(self, "max_new_tokens", "window", "tail",
                                         "confidence_k", "group_size", "offline_traces", "warmup",
                                         "batch")
        config_lib.dtype_name(self.param_dtype, "param_dtype")
        config_lib.require(self.task.kind == "math",
                           f"task.kind={self.task.kind} generates its problems for training; "
                           f"DeepConf evaluates the held-out problems of a file: task.kind=math "
                           f"with task.path (the arithmetic model writes its test problems to "
                           f"its folder's problems.jsonl: configs/deepconf/cpu.yaml)")
        config_lib.require(self.max_prompt_tokens >= 0,
                           f"max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}")
        config_lib.require(all(1 <= k <= self.offline_traces for k in self.ks),
                           f"every K in ks={list(self.ks)} must lie in [1, offline_traces="
                           f"{self.offline_traces}]")
        config_lib.require(self.warmup <= self.offline_traces,
                           f"warmup={self.warmup} must be <= offline_traces (the online budget)")
        for rule in self.rules:
            config_lib.require(rule in voting.RULES,
                               f"unknown rule {rule!r}; choose from {sorted(voting.RULES)}")
            self.online(rule)        # the library's own checks, before anything is written
        self.sampling(stop_ids=(0,))

    def sampling(self, stop_ids: tuple[int, ...]) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, group_size=self.group_size,
                              stop_ids=tuple(stop_ids), window=self.window, tail=self.tail,
                              confidence_k=self.confidence_k, kv_pages=self.kv_pages,
                              decode_kernel=self.decode_kernel, scan_layers=self.scan_layers)

    def online(self, rule: str) -> online.OnlineConfig:
        return online.OnlineConfig(rule=rule, warmup=self.warmup, budget=self.offline_traces,
                                   batch=self.batch, consensus=self.consensus)


def offline_record(traces: online.Traces, reference: str, cfg: Config) -> dict:
    """Correctness and tokens of every offline method at every K (the first K traces)."""
    # Groups form in order of first appearance, so the first K traces' groups are the first K
    # ids of the grouping of all traces: one grouping and one check per group serve every K.
    groups = answers.group_answers([answers.boxed_answer(t) for t in traces.texts])
    group_correct = [answers.is_correct(label, reference) for label in groups.labels]

    def right(group: int) -> bool:
        return group != answers.NO_ANSWER and group_correct[group]

    correct = np.array([right(int(i)) for i in groups.ids])
    metrics = {name: np.asarray(voting.trace_metric(name, traces.confidence, traces.lengths,
                                                    cfg.window, cfg.tail))
               for name in {m for _, m, _, _ in OFFLINE if m}}
    record: dict = {}
    for k in cfg.ks:
        ids, valid = groups.ids[:k], np.ones(k, bool)
        row = {"pass@1": float(correct[:k].mean()), "tokens": int(traces.lengths[:k].sum())}
        for name, weight, metric, keep in OFFLINE:
            if weight is None:
                result = voting.majority_vote(ids, valid)
            elif metric is None:
                result = voting.weighted_vote(ids, valid, metrics[weight][:k])
            else:
                result = voting.filtered_vote(ids, valid, metrics[metric][:k], keep)
            row[name] = right(int(result.answer))
        record[str(k)] = row
    record["traces"] = {"correct": correct.tolist(),
                        **{name: values.round(4).tolist() for name, values in metrics.items()}}
    return record


def trace_specs(problems: int, cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """The offline traces kept under traces/: name -> (shape, dtype), with P = `problems` (every
    held-out problem, before `task.eval_limit`), N = offline_traces, T = max_new_tokens; 0 past
    a trace's length."""
    p, n, t = problems, cfg.offline_traces, cfg.max_new_tokens
    return {"tokens": ((p, n, t), "int32"),          # sampled token ids
            "confidence": ((p, n, t), "float32"),    # token confidence C_i
            "lengths": ((p, n), "int32"),            # generated tokens (stop token included)
            "lowest_group": ((p, n), "float32"),     # lowest group confidence
            "tail": ((p, n), "float32"),             # mean C over the last min(length, tail)
            "finish_reason": ((p, n), "int32")}      # index into sampler.FINISH_REASONS


def trace_rows(samples: sampler.Samples) -> dict[str, np.ndarray]:
    """One problem's host-side samples as its chunk of the trace arrays ([1, N, ...] each)."""
    return {name: np.asarray(value)[None] for name, value in (
        ("tokens", samples.tokens), ("confidence", samples.confidence),
        ("lengths", samples.lengths), ("lowest_group", samples.lowest_group_confidence),
        ("tail", samples.tail_confidence), ("finish_reason", samples.finish_reason))}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (the area
    under the ROC curve, by the Mann-Whitney rank sum); NaN without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main(argv: list[str] | None = None) -> dict:
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    task = cfg.task
    # Every held-out problem has a row in traces/, so that a rerun with a larger
    # task.eval_limit reopens them; this run evaluates the first eval_limit.
    every_problem = tasks.load_splits(dataclasses.replace(task, eval_limit=0)).held_out
    row = {p.id: index for index, p in enumerate(every_problem)}
    problems = every_problem[:task.eval_limit or None]
    tokenizer = hf.load_tokenizer(cfg.model)
    prompt_ids = tasks.encode_prompts(task, tokenizer, problems)
    if cfg.max_prompt_tokens:
        problems, prompt_ids = tasks.fit_prompts(problems, prompt_ids, cfg.max_prompt_tokens,
                                                 task.long_prompts)
    stop_ids = tasks.stop_ids(cfg.model, tokenizer)
    model = hf.load_pretrained(cfg.model, param_dtype=cfg.param_dtype)
    out = results.open_run(cfg.out_dir, cfg, may_change=("task.eval_limit", "online_at_once"))
    results.check_inputs(out, model=cfg.model, task=task.path, eval=task.eval_path)
    path = out / "problems.jsonl"
    done = {record["id"] for record in jsonl.resume_records(path)}
    sampling = cfg.sampling(stop_ids)
    offline_sampling = dataclasses.replace(sampling, budget=cfg.offline_traces)
    traces_store = arrays.open_store(out / "traces", trace_specs(len(every_problem), cfg),
                                     chunk_rows=1)
    stored = arrays.complete_chunks(traces_store)                            # bool [P]
    unstored = [p.id for p, kept in zip(every_problem, stored, strict=True)
                if p.id in done and not kept]
    if unstored:
        log.warning("%d finished problems (e.g. %s) have no traces in %s", len(unstored),
                    unstored[0], traces_store.folder)

    def decode(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    log.info("%d problems (%d done before) of %s, %s, offline K=%s, online rules %s",
             len(problems), len(done), task.eval_path or task.path, cfg.model, list(cfg.ks),
             list(cfg.rules))
    key = jax.random.key(cfg.seed)
    todo = [p for p in problems if p.id not in done]
    token_ids = {p.id: ids for p, ids in zip(problems, prompt_ids, strict=True)}
    problem_keys = {p.id: jax.random.fold_in(key, row[p.id]) for p in problems}
    at_once = {}  # rule -> problem id -> (result, seconds)
    if cfg.online_at_once and todo:
        longest = max(len(token_ids[p.id]) for p in todo)
        for rule in cfg.rules:
            start = time.perf_counter()
            solved = online.solve_many(
                model, [token_ids[p.id] for p in todo],
                jax.numpy.stack([jax.random.fold_in(problem_keys[p.id], 1) for p in todo]),
                sampling, cfg.online(rule), decode, max_prompt_tokens=longest)
            seconds = (time.perf_counter() - start) / len(todo)
            at_once[rule] = {p.id: (r, seconds) for p, r in zip(todo, solved, strict=True)}
    for problem in tqdm(problems, unit="problem", file=sys.stderr):
        if problem.id in done:
            continue
        prompt = token_ids[problem.id]
        problem_key = problem_keys[problem.id]
        start = time.perf_counter()
        samples = jax.device_get(sampler.sample(model, [prompt], problem_key,
                                                offline_sampling))
        traces = online.Traces.from_samples(samples, decode)
        online.weighted_vote(traces)  # answering costs the baseline a vote too
        record = {"id": problem.id, "answer": problem.answer,
                  "offline_seconds": time.perf_counter() - start,
                  "offline": offline_record(traces, problem.answer, cfg), "online": {}}
        for rule in cfg.rules:
            start = time.perf_counter()
            if rule in at_once:
                result, seconds = at_once[rule][problem.id]
            else:
                result = online.solve(model, prompt, jax.random.fold_in(problem_key, 1),
                                      sampling, cfg.online(rule), decode)
                seconds = time.perf_counter() - start
            record["online"][rule] = {
                "correct": answers.is_correct(result.answer, problem.answer),
                "answer": result.answer, "votes": result.votes, "solution": result.solution,
                "launched": result.launched, "stopped": result.stopped,
                "tokens": result.tokens, "threshold": result.threshold,
                "consensus": result.consensus, "seconds": seconds}
        # The chunk before the record: a problem with a record always has its traces.
        arrays.write_chunk(traces_store, row[problem.id], trace_rows(samples))
        jsonl.append_record(path, record)
    # The problems of this config only: a rerun with a smaller eval_limit finds more in the file.
    by_id = {record["id"]: record for record in jsonl.resume_records(path)}
    summary = summarize([by_id[p.id] for p in problems], cfg)
    results.write_json(out / "summary.json", summary)
    plots.accuracy_vs_tokens(summary, out / "accuracy_vs_tokens.png")
    print(table(summary))
    return summary


def summarize(records: list[dict], cfg: Config) -> dict:
    """Accuracy and mean tokens per method; online token and wall-time savings against decoding
    every trace of the budget to the end (offline at K = offline_traces)."""
    full = str(cfg.offline_traces)
    summary = {"problems": len(records), "offline": {}, "online": {}}
    for k in map(str, cfg.ks):
        rows = [r["offline"][k] for r in records]
        tokens = float(np.mean([row["tokens"] for row in rows]))
        summary["offline"][k] = {"pass@1": float(np.mean([row["pass@1"] for row in rows])),
                                 "tokens": tokens,
                                 **{name: float(np.mean([row[name] for row in rows]))
                                    for name, *_ in OFFLINE}}
    baseline_tokens = float(np.mean([r["offline"][full]["tokens"] for r in records])) \
        if full in records[0]["offline"] else None
    baseline_seconds = float(np.mean([r["offline_seconds"] for r in records]))
    for rule in cfg.rules:
        rows = [r["online"][rule] for r in records]
        tokens = float(np.mean([row["tokens"] for row in rows]))
        seconds = float(np.mean([row["seconds"] for row in rows]))
        summary["online"][rule] = {
            "accuracy": float(np.mean([row["correct"] for row in rows])), "tokens": tokens,
            "launched": float(np.mean([row["launched"] for row in rows])),
            "stopped": float(np.mean([row["stopped"] for row in rows])),
            "seconds": seconds, "tokens_saved": 1 - tokens / baseline_tokens
            if baseline_tokens else None, "seconds_saved": 1 - seconds / baseline_seconds}
    summary["offline_seconds"] = baseline_seconds
    # Does confidence tell right traces from wrong ones? Within a problem (what filtering uses)
    # and pooled over problems.
    metrics = [m for m in records[0]["offline"]["traces"] if m != "correct"]
    summary["auroc"] = {}
    for name in metrics:
        within = [auroc(np.asarray(r["offline"]["traces"][name]),
                        np.asarray(r["offline"]["traces"]["correct"])) for r in records]
        pooled = auroc(np.concatenate([r["offline"]["traces"][name] for r in records]),
                       np.concatenate([r["offline"]["traces"]["correct"] for r in records]))
        summary["auroc"][name] = {"within_problem": float(np.nanmean(within)),
                                  "pooled": pooled}
    return summary


def table(summary: dict) -> str:
    names = ["pass@1"] + [name for name, *_ in OFFLINE]
    lines = [f"{summary['problems']} problems; accuracy (%) by method and K, mean tokens"]
    lines.append(f"{'method':>18} " + " ".join(f"{'K=' + k:>8}" for k in summary["offline"]))
    for name in names:
        lines.append(f"{name:>18} " + " ".join(f"{100 * row[name]:8.1f}"
                                             for row in summary["offline"].values()))
    lines.append(f"{'tokens':>18} " + " ".join(f"{row['tokens']:8.0f}"
                                             for row in summary["offline"].values()))
    lines.append("confidence vs correctness, AUROC (0.5 = no signal): " + ", ".join(
        f"{name} {row['within_problem']:.2f} within problems / {row['pooled']:.2f} pooled"
        for name, row in sorted(summary["auroc"].items())))
    lines.append(f"online (budget = largest K; baseline: every trace to the end, "
                 f"{summary['offline_seconds']:.2f} s/problem)")
    for rule, row in summary["online"].items():
        lines.append(f"{rule:>18} accuracy {100 * row['accuracy']:5.1f}%  tokens "
                     f"{row['tokens']:7.0f} ({100 * (row['tokens_saved'] or 0):+.1f}% saved)  "
                     f"traces {row['launched']:.1f} ({row['stopped']:.1f} stopped)  "
                     f"{row['seconds']:.2f} s ({100 * row['seconds_saved']:+.1f}% saved)")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
