"""The pairwise GenRM of Writing-Zero (section 1 of papers/writing_zero.md): cold-start SFT on
judge traces, then GRPO through `jaxlab.rl.loop`.

    python experiments/train_genrm.py --config configs/writing_zero/genrm_qwen3_gpu.yaml [k=v ...]

(in the small world, the `genrm` stage of `experiments/writing_zero.py`).

1. Judge traces (`prompt`, `response_1`, `response_2`, `preferred` 1 or 2, `judge` ending in
   \\boxed{s1,s2}) from `traces`, or written by the writing world's rubric teacher
   (`jaxlab.writing.teacher`) for `teacher_pairs` in both orders when `traces` is empty.
2. The both-order consistency filter (`genrm.cold_start_keep`): a pair's two traces are kept
   only if both prefer its preferred response; counts are reported.
3. Cold-start SFT on the kept traces (loss on the judge's text only).
4. GRPO with the GenRM reward (correctness + format, margin optional) on `rl_pairs` (default:
   the pairs the consistency filter kept, whose labels the teacher confirms in both orders),
   each drawn pair shown in both orders, with dynamic sampling.
Before and after GRPO the judge is evaluated greedily on `eval_pairs` (whose chosen response is
the right one) in both orders: accuracy in each order and in both, the share of verdicts for
the first position, the format-failure rate. Writes config.yaml, log.txt, traces.jsonl (when
written here), sft/ and grpo/ (metrics.jsonl, checkpoints), cold_start/ and genrm/ (the
judge after SFT and after GRPO: Hugging Face folders with the tokenizer and
generation_config.json, rewritten at each checkpoint of their stage, so that transformers'
`AutoModelForCausalLM.from_pretrained` loads the latest), summary.json and curves.png; a rerun
resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import cli, parallel, results
from jaxlab import config as config_lib
from jaxlab.jsonl import Field, read_jsonl, read_records
from jaxlab.models import hf
from jaxlab.rl import genrm, loop, reward_model, scaffold, sft
from jaxlab.sampling import sampler
from jaxlab.writing import judging
from jaxlab.writing import teacher as teacher_lib

log = logging.getLogger("jaxlab")

TRACE_FIELDS = (Field("prompt", str), Field("response_1", str), Field("response_2", str),
                Field("preferred", int), Field("judge", str))


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/writing_zero/genrm"
    model: str = "results/writing_zero/world/genrm_init"  # a local causal-LM folder
    traces: str = ""                # judge traces; empty: the rubric teacher writes them
    teacher_pairs: str = "results/writing_zero/rm/kept_pairs.jsonl"
    rl_pairs: str = ""              # GRPO's pairs; empty: those kept by the consistency filter
    eval_pairs: str = "results/writing_zero/world/true_pairs.jsonl"
    template: str = teacher_lib.TEMPLATE.text  # the judge prompt (genrm.JudgeTemplate.text)
    compute_dtype: str = "float32"  # activations (master weights are float32)
    max_prompt_tokens: int = 80     # judge prompts (SFT rows: + max_new_tokens)
    max_new_tokens: int = 32        # judge text
    seed: int = 0
    teacher: teacher_lib.Teacher = dataclasses.field(default_factory=teacher_lib.Teacher)
    sft: sft.FitConfig = dataclasses.field(default_factory=sft.FitConfig)
    reward: genrm.GenRMReward = dataclasses.field(default_factory=genrm.GenRMReward)
    loop: loop.LoopConfig = dataclasses.field(default_factory=loop.LoopConfig)
    # the devices SFT and GRPO train on: data x fsdp x tensor (with several processes, as many
    # from each); mesh.fsdp=8 splits the parameters and optimizer state (a 4B model,
    # docs/parallel.md)
    mesh: parallel.MeshConfig = dataclasses.field(default_factory=parallel.MeshConfig)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "max_prompt_tokens", "max_new_tokens")
        config_lib.require(self.loop.prompts % 2 == 0, f"loop.prompts must be even (each pair "
                           f"is shown in both orders), got {self.loop.prompts}")
        config_lib.require(self.loop.max_prompt_tokens == self.max_prompt_tokens and
                           self.loop.max_new_tokens == self.max_new_tokens,
                           "loop.max_prompt_tokens / max_new_tokens must equal "
                           "max_prompt_tokens / max_new_tokens")
        genrm.JudgeTemplate(self.template)


def read_traces(path: str | pathlib.Path) -> list[dict]:
    """Judge-trace records (with their `line`); a missing field, a `preferred` other than 1 or
    2 or an empty response is an error naming path:line."""
    rows = [dict(zip([f.key for f in TRACE_FIELDS], r, strict=True))
            for r in read_jsonl(path, TRACE_FIELDS)]
    for line, r in enumerate(rows, 1):
        config_lib.require(r["preferred"] in (1, 2),
                           f"{path}:{line}: preferred must be 1 or 2, got {r['preferred']}")
        for field in ("response_1", "response_2"):
            config_lib.require(r[field].strip() != "", f"{path}:{line}: {field!r} is empty")
        r["line"] = line
    return rows


def consistent_traces(traces: list[dict]) -> tuple[list[dict], dict]:
    """The traces of pairs judged in both orders whose two verdicts both prefer the preferred
    response (`genrm.cold_start_keep`), and the counts."""
    index = {(t["prompt"], t["response_1"], t["response_2"]): t for t in traces}
    firsts = [t for t in traces if t["preferred"] == 1]
    twins = [(t, index.get((t["prompt"], t["response_2"], t["response_1"]))) for t in firsts]
    twins = [(a, b) for a, b in twins if b is not None and b["preferred"] == 2]
    ab = genrm.scores_array([genrm.parse_scores(a["judge"]) for a, _ in twins])
    ba = genrm.scores_array([genrm.parse_scores(b["judge"]) for _, b in twins])
    keep = np.asarray(genrm.cold_start_keep(*map(jnp.asarray, (*ab, *ba)),
                                            jnp.zeros(len(twins), jnp.int32)))
    kept = [t for (a, b), k in zip(twins, keep, strict=True) if k for t in (a, b)]
    return kept, {"traces": len(traces), "pairs_in_both_orders": len(twins),
                  "pairs_kept": int(keep.sum())}


def evaluate(model, codec: sft.TextCodec, template: genrm.JudgeTemplate, pairs: list[dict],
             cfg: Config) -> dict:
    """Greedy verdicts on `pairs` in both orders: `genrm.verdict_metrics`, and for the writing
    world's judge prompt `judging.report` (accuracy by quality gap, per-criterion accuracy by
    position) too."""
    greedy = sampler.SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                    stop_ids=(codec.eos_id,), confidence=False)
    prompts = [codec.prompt(genrm.judge_prompt(p["prompt"], *order, template)) for p in pairs
               for order in ((p["chosen"], p["rejected"]), (p["rejected"], p["chosen"]))]
    samples = jax.device_get(sampler.sample(model, prompts, jax.random.key(0), greedy,
                                            max_prompt_tokens=cfg.max_prompt_tokens))
    texts = [codec.decode(samples.tokens[i, :samples.lengths[i]]) for i in range(len(prompts))]
    if template.text == teacher_lib.TEMPLATE.text:
        return judging.report(pairs, texts[0::2], texts[1::2], cfg.teacher.rubric)
    ab, ba = (genrm.scores_array([genrm.parse_scores(t) for t in texts[k::2]]) for k in (0, 1))
    return {k: float(v) for k, v in genrm.verdict_metrics(*ab, *ba).items()}


def prompt_fn(pairs: list[dict], codec: sft.TextCodec, template: genrm.JudgeTemplate):
    """count / 2 pairs drawn without replacement (a function of the key), each shown in both
    orders; a prompt's `data` is `genrm.Shown`: the shown position (0 or 1) of its chosen
    response and the pair's index."""
    def draw(key: jax.Array, count: int) -> list[loop.Prompt]:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        prompts = []
        for k in rng.choice(len(pairs), count // 2, replace=False):
            p = pairs[k]
            for first, second, preferred in ((p["chosen"], p["rejected"], 0),
                                             (p["rejected"], p["chosen"], 1)):
                tokens = codec.prompt(genrm.judge_prompt(p["prompt"], first, second, template))
                prompts.append(loop.Prompt(tuple(tokens), genrm.Shown(preferred, int(k))))
        return prompts
    return draw


def plot(sft_records: list[dict], rl_records: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    axes[0].plot([r["step"] for r in sft_records], [r["loss"] for r in sft_records])
    axes[0].set_title("cold-start SFT loss")
    axes[0].set_xlabel("step")
    for ax, name in zip(axes[1:], ("reward_mean", "accuracy", "format_failure"), strict=True):
        ax.plot([r["step"] for r in rl_records], [r[name] for r in rl_records])
        ax.set_title(f"GRPO {name}")
        ax.set_xlabel("step")
    fig.tight_layout()
    results.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    mesh = cfg.mesh.build()  # before any work: an error if the devices are not there
    out = results.open_run(cfg.out_dir, cfg)
    results.check_inputs(out, model=cfg.model, traces=cfg.traces, rl_pairs=cfg.rl_pairs,
                         teacher_pairs="" if cfg.traces else cfg.teacher_pairs,
                         eval_pairs=cfg.eval_pairs)
    codec, template = sft.TextCodec(cfg.model), genrm.JudgeTemplate(cfg.template)
    config_lib.require(codec.eos_id in cfg.loop.stop_ids, f"loop.stop_ids {cfg.loop.stop_ids} "
                       f"must hold the checkpoint's EOS id {codec.eos_id}")
    traces_path = pathlib.Path(cfg.traces) if cfg.traces else out / "traces.jsonl"
    if not cfg.traces:
        records = teacher_lib.judge_records(reward_model.read_pairs(cfg.teacher_pairs),
                                            cfg.seed, cfg.teacher)
        results.write_text(traces_path, "".join(json.dumps(r) + "\n" for r in records))
    kept, counts = consistent_traces(read_traces(traces_path))
    rl_pairs = reward_model.read_pairs(cfg.rl_pairs) if cfg.rl_pairs else [
        {"prompt": t["prompt"], "chosen": t["response_1"], "rejected": t["response_2"]}
        for t in kept if t["preferred"] == 1]
    eval_pairs = reward_model.read_pairs(cfg.eval_pairs)
    log.info("judge traces: %s", counts)
    config_lib.require(counts["pairs_kept"] > 0, f"no pair of {traces_path} passes the "
                                                 f"both-order consistency filter")
    prompts = [codec.prompt(genrm.judge_prompt(t["prompt"], t["response_1"], t["response_2"],
                                               template)) for t in kept]
    targets = [codec.response(t["judge"]) for t in kept]
    for name, rows, limit in (("judge prompt", prompts, cfg.max_prompt_tokens),
                              ("judge text", targets, cfg.max_new_tokens)):
        long = [i for i, r in enumerate(rows) if len(r) > limit]
        config_lib.require(not long, f"{traces_path}:{kept[long[0]]['line'] if long else 0}: "
                           f"the {name} has more than {limit} tokens")
    longest = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    data = sft.sft_batch(prompts, targets, -(-longest // 16) * 16)   # few padded columns
    model = hf.load_pretrained(cfg.model, param_dtype="float32", compute_dtype=cfg.compute_dtype)
    start = time.perf_counter()
    ids = {"eos_token_id": codec.eos_id, "pad_token_id": codec.tokenizer.pad_token_id}
    model = sft.fit(model, sft.sft_loss, data, cfg.sft, out / "sft",
                    key=jax.random.key(cfg.seed), mesh=mesh, where="sft.",
                    on_save=scaffold.export_policy(model, out / "cold_start", codec.tokenizer,
                                                   **ids))
    sft_seconds = time.perf_counter() - start
    summary = {"traces": counts, "sft_seconds": sft_seconds,
               "cold_start": evaluate(model, codec, template, eval_pairs, cfg)}
    log.info("cold start on %d held-out pairs: %s", len(eval_pairs), summary["cold_start"])
    start = time.perf_counter()
    graphdef, state = loop.run(
        model, prompt_fn(rl_pairs, codec, template),
        genrm.genrm_reward_fn(codec.decode, cfg.reward), cfg.loop, out / "grpo",
        key=jax.random.key(cfg.seed), mesh=mesh,
        on_save=scaffold.export_policy(
            model, out / "genrm", codec.tokenizer, **ids,
            **hf.generation_fields(cfg.loop.temperature, cfg.loop.top_k, cfg.loop.top_p)))
    trained = nnx.merge(graphdef, jax.tree.map(parallel.host_array, state.params))
    summary["grpo_seconds"] = time.perf_counter() - start
    summary["after_grpo"] = evaluate(trained, codec, template, eval_pairs, cfg)
    summary["eval_pairs"] = len(eval_pairs)
    rl_records = read_records(out / "grpo" / "metrics.jsonl")
    summary["groups_dropped"] = [r["groups_dropped"] for r in rl_records]
    log.info("after GRPO: %s", summary["after_grpo"])
    results.write_json(out / "summary.json", summary)
    read = [read_records(out / d / "metrics.jsonl") for d in ("sft", "grpo")]
    plot(*read, out / "curves.png")
    return summary


if __name__ == "__main__":
    cli.run(main)
