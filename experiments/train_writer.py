"""The writer of Writing-Zero: BRPO against a pairwise judge, and GRPO on scalar rewards
(sections 2-3 of papers/writing_zero.md), from the same initial policy, on the same prompts and
budget, through `jaxlab.rl.loop`; on the small writing world, or on a file of writing prompts.

    python experiments/train_writer.py --config configs/writing_zero/writer_qwen3_gpu.yaml [k=v ...]

(in the small world, the `writer` stage of `experiments/writing_zero.py`).

Prompts: `prompts` empty draws the small world's prompts (whose hidden true quality and
redundant explanation are measured, and whose judge prompt is the world teacher's); a file
(JSON Lines, parquet or a `datasets` folder with a string field "prompt") draws from its
prompts, judged through `template` (the GenRM's judge prompt, `genrm.JudgeTemplate`), with the
measures that need no task: words, distinct bigrams and the scalar RM's reward.

Methods (`methods`):
  brpo_genrm      per group a reference drawn at random, every other response judged against it
                  by the GenRM in both orders and `votes` times (all judge prompts of a step in
                  one sampler call), +1 / -1 rewards (0 for the reference), the outlier filter,
                  the rewards as advantages
  brpo_teacher    the same with the world's rubric teacher as the judge (no model call): BRPO
                  with a judge as good as the GenRM's teacher (world only)
  grpo_scalar_rm  the Bradley-Terry RM's reward r(x, y), group z-scores (ScalarRM-GRPO)
  grpo_ideal_rm   the ideal rater-RM's reward (`world.ideal_rater_reward`: what a reward model
                  of the rater's labels learns at best, length confound included; world only)
  grpo_true       the hidden true quality itself (world only)
Every step logs, besides the loop's metrics, the word count, the distinct-bigram ratio and
the scalar RM's reward of the rollouts (in the world also the hidden true quality and the
redundant explanation, the words after the answer's "."); BRPO also logs judge seconds and
judge tokens/s. Before and after training each writer is evaluated on fixed prompts: those
measures, the scalar RM's reward, the KL from the initial writer (the mean over sampled
responses of sum_t log pi(y_t) - log pi_0(y_t)) and the GenRM's win rate against the initial
writer (a win: preferred in both orders). Writes config.yaml, log.txt, summary.json (the
table), curves.png, and per method metrics.jsonl, checkpoints/, samples/step_*.json and
policy/ (the writer as a Hugging Face folder with its tokenizer and generation_config.json:
EOS, padding and the rollouts' sampling; rewritten at every checkpoint, so that transformers'
`AutoModelForCausalLM.from_pretrained` loads the latest, and the trained writer at the end);
a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from jaxlab import cli, parallel, results
from jaxlab import config as config_lib
from jaxlab.jsonl import read_records
from jaxlab.models import hf
from jaxlab.rl import genrm, loop, reward_model, scaffold, sft, train
from jaxlab.sampling import sampler
from jaxlab.writing import teacher, world

log = logging.getLogger("jaxlab")

METHODS = ("brpo_genrm", "brpo_teacher", "grpo_scalar_rm", "grpo_ideal_rm", "grpo_true")
WORLD_METHODS = ("brpo_teacher", "grpo_ideal_rm", "grpo_true")  # need the hidden rubric
RENAMED = {"brpo": "brpo_genrm", "scalar_grpo": "grpo_scalar_rm"}
WORLD_MEASURES = ("quality", "redundant_words")  # measures only the small world defines
MEASURES = ("quality", "words", "redundant_words", "distinct_bigrams", "scalar_rm")
JUDGE_TEMPLATE = genrm.DEFAULT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "results/writing_zero/writer"
    writer: str = "results/writing_zero/world/writer"   # the initial policy
    genrm: str = "results/writing_zero/genrm/genrm"
    rm: str = "results/writing_zero/rm/rm"
    methods: tuple[str, ...] = METHODS
    prompts: str = ""                 # writing prompts ("prompt" field); "": the small world's
    template: str = JUDGE_TEMPLATE    # the judge prompt for `prompts` (the GenRM's)
    compute_dtype: str = "float32"  # activations (master weights are float32)
    votes: int = 1                    # BRPO: verdicts per order and pair
    judge_temperature: float = 0.0    # 0: greedy verdicts
    judge_max_prompt_tokens: int = 80
    judge_max_new_tokens: int = 32
    rm_length: int = 48               # the RM's rows: prompt + response
    eval_prompts: int = 64
    eval_samples: int = 4             # responses per eval prompt
    samples_every: int = 10           # steps between samples/step_*.json
    seed: int = 0
    task: world.WorldConfig = dataclasses.field(default_factory=world.WorldConfig)
    loop: loop.LoopConfig = dataclasses.field(default_factory=loop.LoopConfig)
    # the devices the writer trains on: data x fsdp x tensor (with several processes, as many
    # from each); mesh.fsdp=8 splits the parameters and optimizer state (a 4B model,
    # docs/parallel.md)
    mesh: parallel.MeshConfig = dataclasses.field(default_factory=parallel.MeshConfig)

    def __post_init__(self):
        config_lib.require_positive_ints(self, "votes", "judge_max_prompt_tokens",
                                         "judge_max_new_tokens", "rm_length", "eval_prompts",
                                         "eval_samples", "samples_every")
        renamed = {m: RENAMED[m] for m in self.methods if m in RENAMED}
        config_lib.require(not renamed, f"methods: {list(renamed)} are now called "
                                        f"{list(renamed.values())}")
        bad = [m for m in self.methods if m not in METHODS]
        config_lib.require(not bad and self.methods,
                           f"methods must be a non-empty list of {METHODS}, got {self.methods}")
        world_only = [m for m in self.methods if m in WORLD_METHODS]
        config_lib.require(not (self.prompts and world_only),
                           f"methods {world_only} need the small world's rubric (prompts: \"\")")
        config_lib.require(self.judge_temperature > 0 or self.votes == 1,
                           f"votes={self.votes} needs judge_temperature > 0 (greedy verdicts "
                           f"repeat)")
        genrm.JudgeTemplate(self.template)
        if not self.prompts:  # the world's judge prompts have a known length
            longest = 2 + self.task.required + 2 * self.loop.max_new_tokens + 3
            config_lib.require(longest <= self.judge_max_prompt_tokens,
                               f"judge prompts of two {self.loop.max_new_tokens}-token "
                               f"responses need judge_max_prompt_tokens >= {longest}")

    @property
    def measures(self) -> tuple[str, ...]:
        """The measures of this run's prompts (the world's need its hidden rubric)."""
        return tuple(m for m in MEASURES if self.prompts == "" or m not in WORLD_MEASURES)

    @property
    def load_options(self) -> dict:
        return {"param_dtype": "float32", "compute_dtype": self.compute_dtype}

    def method_loop(self, method: str) -> loop.LoopConfig:
        """BRPO takes the rewards as advantages (its outlier filter replaces dynamic
        sampling); ScalarRM-GRPO uses group z-scores."""
        if method.startswith("brpo"):
            return dataclasses.replace(self.loop, advantage="brpo", dynamic_sampling=False)
        return dataclasses.replace(self.loop, advantage="grpo")


def prompt_fn(cfg: Config, codec: sft.TextCodec):
    """Prompts drawn from the key (a prompt's `data` is its text): fresh world prompts, or
    `count` of the prompt file's (without replacement when the file has that many)."""
    texts = ([r["prompt"] for r in reward_model.read_table(cfg.prompts, ("prompt",),
                                                             "writing prompts")]
             if cfg.prompts else None)

    def draw(key: jax.Array, count: int) -> list[loop.Prompt]:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
        if texts is None:
            chosen = [world.prompt_text(world.draw_required(rng, cfg.task))
                      for _ in range(count)]
        else:
            chosen = [texts[i] for i in rng.choice(len(texts), count,
                                                   replace=count > len(texts))]
        return [loop.Prompt(tuple(codec.prompt(t)), t) for t in chosen]
    return draw


def measures(prompt: str, response: str, in_world: bool) -> dict[str, float]:
    """The measures of one response text: words and distinct bigrams, and in the world also
    the hidden quality and the redundant explanation."""
    out = {"words": len(response.split()), "distinct_bigrams": world.distinct_bigrams(response)}
    if in_world:
        out.update(quality=world.quality(world.required_words(prompt), response),
                   redundant_words=world.redundant_words(response))
    return out


def judge_text(cfg: Config, prompt: str, first: str, second: str) -> str:
    """The GenRM's input for an ordered pair: the world teacher's judge prompt, or the
    configured template for a prompt file."""
    if not cfg.prompts:
        return teacher.judge_prompt(prompt, first, second)
    return genrm.judge_prompt(prompt, first, second, genrm.JudgeTemplate(cfg.template))


class Rewards:
    """The writer's reward functions, and what it takes to build them."""

    def __init__(self, cfg: Config, codec: sft.TextCodec):
        self.cfg, self.codec = cfg, codec
        self.rm = reward_model.load(cfg.rm, **cfg.load_options)
        self.judge = genrm.Judge(
            model=hf.load_pretrained(cfg.genrm, **cfg.load_options), decode=codec.decode,
            max_prompt_tokens=cfg.judge_max_prompt_tokens,
            sampling=sampler.SamplingConfig(
                max_new_tokens=cfg.judge_max_new_tokens, temperature=cfg.judge_temperature,
                group_size=cfg.votes, stop_ids=(codec.eos_id,), confidence=False))
        self.scalar = reward_model.scalar_reward_fn(self.rm, self.rm_input, cfg.rm_length)

    def rm_input(self, prompt: loop.Prompt, response: list[int]) -> list[int]:
        return [*prompt.tokens, *response]

    def judge_input(self, prompt: loop.Prompt, first: list[int], second: list[int]
                    ) -> list[int]:
        return self.codec.prompt(judge_text(self.cfg, prompt.data, self.codec.decode(first),
                                            self.codec.decode(second)))

    def teacher_input(self, prompt: loop.Prompt, first: list[int], second: list[int]
                      ) -> tuple[str, str, str]:
        return prompt.data, self.codec.decode(first), self.codec.decode(second)

    def world_reward(self, score):
        """A per-response reward from `score(required words, response text)`."""
        return loop.per_response(lambda prompt, response, truncated: score(
            world.required_words(prompt.data), self.codec.decode(response)))

    def base(self, method: str) -> loop.RewardFn:
        """The reward the method trains on."""
        if method == "brpo_genrm":
            return genrm.brpo_reward_fn(self.judge, self.judge_input)
        if method == "brpo_teacher":
            return genrm.brpo_reward_fn(teacher.TeacherJudge(), self.teacher_input)
        if method == "grpo_ideal_rm":
            return self.world_reward(lambda required, text: world.ideal_rater_reward(
                required, text, self.cfg.task))
        if method == "grpo_true":
            return self.world_reward(world.quality)
        return self.scalar

    def for_method(self, method: str) -> loop.RewardFn:
        """The method's reward plus the measures and the scalar RM's reward."""
        base = self.base(method)

        def reward_fn(prompts, responses, truncated):
            out = base(prompts, responses, truncated)
            out = dict(out) if isinstance(out, dict) else {"reward": out}
            out["scalar_rm"] = (out["reward"] if method == "grpo_scalar_rm"
                                else self.scalar(prompts, responses, truncated))
            rows = [measures(p.data, self.codec.decode(r), not self.cfg.prompts)
                    for p, group in zip(prompts, responses, strict=True) for r in group]
            for name in rows[0]:
                out[name] = np.asarray([r[name] for r in rows]).reshape(truncated.shape)
            return out
        return reward_fn


def write_samples(out: pathlib.Path, codec: sft.TextCodec, every: int):
    """A `loop.run` hook writing the first two groups every `every` steps."""
    def hook(step, prompts, responses, values):
        if step % every:
            return
        groups = [{"prompt": prompts[g].data, "responses": [
            {"text": codec.decode(r), **{k: float(v[g, j]) for k, v in values.items()
                                         if k in ("reward", "quality", "scalar_rm")}}
            for j, r in enumerate(responses[g])]} for g in range(min(2, len(prompts)))]
        results.write_json(out / f"step_{step:04d}.json", groups)
    return hook


def kl_from(model, initial, prompts: list[loop.Prompt], responses: list[list[int]],
            eval_samples: int) -> float:
    """KL(pi || pi_0) estimated on responses sampled from `model` at temperature 1: the mean
    over responses of sum_t log pi(y_t | x, y_<t) - log pi_0(y_t | x, y_<t)."""
    rows = sft.sft_batch([prompts[i // eval_samples].tokens for i in range(len(responses))],
                         responses, max(len(prompts[i // eval_samples].tokens) + len(r)
                                        for i, r in enumerate(responses)))
    logp = [np.asarray(train.sequence_logprobs(m, rows["tokens"], rows["mask"])[0])
            for m in (model, initial)]                                    # [N, T] each
    return float(np.mean(np.sum(rows["loss_mask"] * (logp[0] - logp[1]), axis=1)))


def evaluate(model, rewards: Rewards, prompts: list[loop.Prompt],
             reference: list[list[int]] | None, cfg: Config, initial=None
             ) -> tuple[dict, list[list[int]]]:
    """Means of the measures and the scalar RM's reward over `eval_samples` responses per prompt
    (fixed key), the KL from `initial` (`kl_from`, when given), and the GenRM's win and loss
    rates against `reference` (the initial writer's responses, slot by slot; a win: preferred
    in both orders)."""
    config = sampler.SamplingConfig(
        max_new_tokens=cfg.loop.max_new_tokens, temperature=cfg.loop.temperature,
        group_size=cfg.eval_samples, stop_ids=cfg.loop.stop_ids, confidence=False)
    key = jax.random.key(cfg.seed + (2 if reference is not None else 1))
    s = jax.device_get(sampler.sample(model, [p.tokens for p in prompts], key, config,
                                      max_prompt_tokens=cfg.loop.max_prompt_tokens))
    responses = [s.tokens[i, :s.lengths[i]].tolist() for i in range(len(s.lengths))]
    groups = [responses[i * cfg.eval_samples:(i + 1) * cfg.eval_samples]
              for i in range(len(prompts))]
    truncated = np.zeros((len(prompts), cfg.eval_samples), bool)
    values = loop.checked_rewards(rewards.for_method("grpo_scalar_rm"), prompts, groups,
                                  truncated, "evaluation")
    table = {name: float(np.mean(values[name])) for name in cfg.measures}
    if initial is not None:
        table["kl"] = kl_from(model, initial, prompts, responses, cfg.eval_samples)
    if reference is not None:
        owners = [prompts[i // cfg.eval_samples] for i in range(len(responses))]
        requests = [rewards.judge_input(p, *pair) for p, mine, ref in
                    zip(owners, responses, reference, strict=True)
                    for pair in ((mine, ref), (ref, mine))]
        scores, valid, _ = rewards.judge.verdicts(requests, jax.random.key(cfg.seed))
        scores, valid = scores[:, 0].reshape(-1, 2, 2), valid[:, 0].reshape(-1, 2)
        verdict = genrm.consistent_preference(scores[:, 0], valid[:, 0], scores[:, 1],
                                              valid[:, 1])
        table["genrm_win_rate"] = float(np.mean(np.asarray(verdict) == 1))
        table["genrm_loss_rate"] = float(np.mean(np.asarray(verdict) == -1))
    return table, responses


def plot(records: dict[str, list[dict]], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("reward_mean", "quality", "words", "redundant_words", "distinct_bigrams",
             "scalar_rm", "kl", "entropy")
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, name in zip(axes.flat, names, strict=True):
        for method, rows in records.items():
            if rows and name in rows[0]:
                ax.plot([r["step"] for r in rows], [r[name] for r in rows], label=method)
        ax.set_title(name)
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    results.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    results.join_processes()  # before JAX touches a backend
    cfg = config_lib.from_command_line(Config, argv, __doc__.splitlines()[0])
    mesh = cfg.mesh.build()  # before any work: an error if the devices are not there
    genrm.check_same_tokenizer(cfg.genrm, cfg.writer)
    genrm.check_same_tokenizer(cfg.rm, cfg.writer)
    out = results.open_run(cfg.out_dir, cfg)
    results.check_inputs(out, writer=cfg.writer, genrm=cfg.genrm, rm=cfg.rm, prompts=cfg.prompts)
    codec = sft.TextCodec(cfg.writer)
    config_lib.require(cfg.loop.stop_ids == (codec.eos_id,),
                       f"loop.stop_ids must be [{codec.eos_id}] (the writer's EOS)")
    rewards = Rewards(cfg, codec)
    eval_prompts = prompt_fn(cfg, codec)(jax.random.key(10_000 + cfg.seed), cfg.eval_prompts)
    initial = hf.load_pretrained(cfg.writer, **cfg.load_options)
    summary = results.read_json(out / "summary.json", {})
    _, reference = evaluate(initial, rewards, eval_prompts, None, cfg)
    summary["start"], _ = evaluate(initial, rewards, eval_prompts, reference, cfg, initial)
    for method in cfg.methods:
        start = time.perf_counter()
        graphdef, state = loop.run(
            hf.load_pretrained(cfg.writer, **cfg.load_options), prompt_fn(cfg, codec),
            rewards.for_method(method), cfg.method_loop(method), out / method,
            key=jax.random.key(cfg.seed), mesh=mesh,
            on_step=write_samples(out / method / "samples", codec, cfg.samples_every),
            on_save=scaffold.export_policy(  # policy/ at every checkpoint (initial's graph)
                initial, out / method / "policy", codec.tokenizer, eos_token_id=codec.eos_id,
                pad_token_id=codec.tokenizer.pad_token_id,
                **hf.generation_fields(cfg.loop.temperature, cfg.loop.top_k, cfg.loop.top_p)))
        trained = nnx.merge(graphdef, jax.tree.map(parallel.host_array, state.params))
        rows = read_records(out / method / "metrics.jsonl")
        end, _ = evaluate(trained, rewards, eval_prompts, reference, cfg, initial)
        step_seconds = sum(r["rollout_seconds"] + r["train_seconds"] for r in rows)
        summary[method] = {"end": end, "seconds_this_run": time.perf_counter() - start,
                           "step_seconds": step_seconds, "steps": len(rows)}
        if method.startswith("brpo"):
            judge_seconds = sum(r["judge_seconds"] for r in rows)
            summary[method].update({
                "judge_tokens_per_s": float(np.mean([r["judge_tokens_per_s"] for r in rows])),
                "judge_share_of_step": judge_seconds / step_seconds})
        results.write_json(out / "summary.json", summary)
        log.info("%s: %s", method, summary[method])
    plot({m: read_records(out / m / "metrics.jsonl") for m in cfg.methods}, out / "curves.png")
    return summary


if __name__ == "__main__":
    cli.run(main)
