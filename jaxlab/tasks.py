"""Tasks for RL and DeepConf: problems from a file, their prompts, their rewards, their held-out
evaluation.

    task = TaskConfig(kind="math", path="gsm8k.jsonl", problem_field="question")
    train, held_out = load_splits(task)                    # [Problem(id, prompt, answer, where)]
    ids = encode_prompts(task, tokenizer, train)           # token ids through the chat template
    train, ids = fit_prompts(train, ids, max_prompt_tokens, task.long_prompts)
    reward_fn = task_rewards(task, decode)                 # a `loop.RewardFn`

Two kinds:
- `math`: problems read from `path`, a JSON Lines file (`.jsonl`), a parquet file (`.parquet`)
  or a folder written by `datasets`' `save_to_disk` (its `split`). A response's answer is the
  content of its last `\\boxed{...}`, else the last number it writes ("The answer is 72"); it is
  right when math-verify finds it equal to the reference (`jaxlab.deepconf.answers.is_correct`:
  `1/2`, `0.5` and `\\frac12` are one answer). A reference written GSM8K's way (a solution
  ending `#### 72`) is the text after the last `####`.
- `arithmetic`: the built-in task of `jaxlab.deepconf.arithmetic` (fresh sums of `terms` numbers,
  the arithmetic model's character tokenizer, exact integer answers); it reads no file.

The reward is a weighted sum of named reward functions (`REWARDS`, as TRL's `reward_weights`),
each (response text, reference answer) -> a number, logged apart: `accuracy` (1 for a right
answer) and `format` (1 for a boxed answer, right or wrong). A response without an answer scores
0; a reward function never raises on a response (math-verify's own errors and timeouts count as
a wrong answer).

Held out (`load_splits`): the rows of `eval_path`, or else a fraction `eval_fraction` of `path`'s
rows drawn by `eval_seed`; a training row whose problem text is also held out is dropped (the
count is logged), so the run never trains on what it is evaluated on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxlab.config import require
from jaxlab.deepconf import answers, prompts
from jaxlab.jsonl import DataError, check_unique, located_records

log = logging.getLogger("jaxlab")

KINDS = ("arithmetic", "math")
LONG_PROMPTS = ("error", "drop")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The `task` section of the RL and DeepConf configs."""

    kind: str = "math"              # "math" (problems from `path`) or "arithmetic" (built in)
    path: str = ""                  # math: .jsonl, .parquet or a `datasets` save_to_disk folder
    split: str = "train"            # the split of a `datasets` folder holding several
    problem_field: str = "problem"  # the row's problem text
    answer_field: str = "answer"    # the row's reference answer (a string or a number)
    id_field: str = ""              # a unique id per row ("": the row's number, from 1)
    eval_path: str = ""             # held-out problems in a second file ("": a fraction of path)
    eval_split: str = "test"        # the split of a `datasets` folder given as eval_path
    eval_fraction: float = 0.1      # held out of `path` when there is no eval_path
    eval_seed: int = 0              # which rows are held out
    eval_limit: int = 0             # the first N held-out problems are evaluated (0: all)
    system_prompt: str = ""         # a system turn before each problem ("": none)
    instruction: str = prompts.INSTRUCTION  # after the problem, in the user turn ("": none)
    chat_template: bool = True      # prompts through the tokenizer's chat template
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # passed to
    #                                 the template: {enable_thinking: false} for Qwen3's
    #                                 answers without a thinking block
    long_prompts: str = "error"     # a prompt over max_prompt_tokens: "error" names its row;
    #                                 "drop" leaves it out (the count is logged)
    rewards: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.0})  # name -> weight (REWARDS)
    terms: int = 4                  # arithmetic: numbers per sum
    problem_pool: int = 0           # arithmetic: draw from a fixed set of this many (0: fresh)

    def __post_init__(self):
        require(self.kind in KINDS, f"task.kind must be one of {list(KINDS)}, got {self.kind!r}")
        require(self.long_prompts in LONG_PROMPTS, f"task.long_prompts must be one of "
                                                   f"{list(LONG_PROMPTS)}, got "
                                                   f"{self.long_prompts!r}")
        require(0 < self.eval_fraction <= 1,
                f"task.eval_fraction must lie in (0, 1], got {self.eval_fraction}")
        require(self.eval_limit >= 0, f"task.eval_limit must be >= 0, got {self.eval_limit}")
        require(self.terms >= 1 and self.problem_pool >= 0,
                f"task.terms must be >= 1 and task.problem_pool >= 0, got {self.terms} and "
                f"{self.problem_pool}")
        unknown = sorted(set(self.rewards) - set(REWARDS))
        require(not unknown, f"task.rewards names {unknown}; the reward functions are "
                             f"{sorted(REWARDS)}")
        bad = {k: w for k, w in self.rewards.items() if not (math.isfinite(w) and w >= 0)}
        require(not bad, f"task.rewards weights must be finite and >= 0, got {bad}")
        require(any(self.rewards.values()), "task.rewards gives every reward weight 0")
        if self.kind == "arithmetic":  # (a math task's empty path is refused when it is read:
            #                               a config file may leave it to the command line)
            require(not self.path and not self.eval_path,
                    "task.kind=arithmetic generates its problems: task.path and task.eval_path "
                    "must be empty (kind=math reads a file)")


class Problem(NamedTuple):
    """One problem of a task file."""

    id: str
    prompt: str     # the problem text
    answer: str     # the reference answer
    where: str      # "file:line" (JSON Lines) or "file row N": where error messages point


# ----------------------------------------------------------------------------- reading


def read_rows(path: str | pathlib.Path, split: str = "train") -> list[tuple[str, dict]]:
    """(where, row) for every row of a JSON Lines file, a parquet file or a `datasets` folder
    (`split` of a DatasetDict); DataError naming the file for anything else."""
    path = pathlib.Path(path)
    if path.is_dir():
        return _dataset_rows(path, split)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors name no file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]
    if path.suffix in (".jsonl", ".json"):
        try:
            return located_records(path)
        except DataError as e:
            raise DataError(f"{e} (a task file is JSON Lines: one JSON object per line)"
                            ) from None
    raise DataError(f"{path}: a task file must be JSON Lines (.jsonl), parquet (.parquet) or a "
                    f"datasets folder (save_to_disk), not {path.suffix or 'without a suffix'}")


def _dataset_rows(folder: pathlib.Path, split: str) -> list[tuple[str, dict]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except FileNotFoundError as e:
        raise DataError(f"{folder}: not a folder written by datasets' save_to_disk ({e})"
                        ) from None
    if isinstance(data, datasets.DatasetDict):
        require(split in data, f"{folder} has the splits {sorted(data)}, not {split!r} (set "
                               f"task.split or task.eval_split)")
        data, where = data[split], f"{folder} ({split})"
    else:
        where = str(folder)
    return [(f"{where} row {i}", row) for i, row in enumerate(data, 1)]


def reference_answer(value: str) -> str:
    """The answer of a reference: the text after the last `####` (GSM8K's solutions end
    `#### 72`), else the whole value, stripped."""
    return value.rsplit("####", 1)[-1].strip()


def load_problems(task: TaskConfig, path: str, split: str) -> list[Problem]:
    """Every problem of one file; DataError naming file:line (or row) for a row without the
    problem or answer field, an empty problem, a value of the wrong type, or a repeated id."""
    problems = []
    for index, (where, row) in enumerate(read_rows(path, split), 1):
        problem = _field(row, task.problem_field, where, "task.problem_field", (str,))
        answer = _field(row, task.answer_field, where, "task.answer_field", (str, int, float))
        if not problem.strip():
            raise DataError(f"{where}: empty {task.problem_field!r}")
        ident = (str(_field(row, task.id_field, where, "task.id_field", (str, int)))
                 if task.id_field else str(index))
        problems.append(Problem(ident, problem, reference_answer(str(answer)), where))
    if not problems:
        raise DataError(f"{path} holds no problems")
    check_unique([p.id for p in problems], "id", str(path), [p.where for p in problems])
    return problems


def _field(row: dict, name: str, where: str, setting: str, kinds: tuple[type, ...]):
    if name not in row:
        raise DataError(f"{where}: no field {name!r} (the row has {sorted(row)}; {setting} "
                        f"names the field to read)")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise DataError(f"{where}: {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {type(value).__name__} {value!r}"[:300])
    return value


def _text_key(problem: str) -> str:
    """A problem's text with whitespace runs collapsed: problems that differ only there are
    one problem."""
    return " ".join(problem.split())


class Splits(NamedTuple):
    train: list[Problem]     # what the run trains on
    held_out: list[Problem]  # what it is evaluated on, never trained on


def load_splits(task: TaskConfig) -> Splits:
    """A math task's problems split into training and held-out ones (see the module's
    docstring); the held-out ones cut to `eval_limit`."""
    require(task.kind == "math", "load_splits reads a math task's files (kind=math)")
    require(bool(task.path), "task.path is empty: a math task reads its problems from a file "
                             "(.jsonl, .parquet or a datasets folder); give task.path=FILE")
    rows = load_problems(task, task.path, task.split)
    if task.eval_path:
        train, held_out = rows, load_problems(task, task.eval_path, task.eval_split)
    else:
        order = np.random.default_rng(task.eval_seed).permutation(len(rows))
        count = max(1, round(task.eval_fraction * len(rows)))
        chosen = set(order[:count].tolist())
        held_out = [p for i, p in enumerate(rows) if i in chosen]
        train = [p for i, p in enumerate(rows) if i not in chosen]
    seen = {_text_key(p.prompt) for p in held_out}
    overlap = sum(_text_key(p.prompt) in seen for p in train)
    if overlap:
        log.warning("%d training problems of %s are also held out: they are left out of "
                    "training", overlap, task.path)
        train = [p for p in train if _text_key(p.prompt) not in seen]
    return Splits(train, held_out[:task.eval_limit or None])


# ----------------------------------------------------------------------------- prompts


def encode_prompts(task: TaskConfig, tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """Token ids of each problem's prompt (`prompts.build_prompts`: the chat template with the
    task's system prompt, instruction and template arguments)."""
    return prompts.build_prompts(tokenizer, [p.prompt for p in problems], task.chat_template,
                                 task.instruction, task.system_prompt,
                                 task.chat_template_kwargs)


def fit_prompts(problems: Sequence[Problem], ids: Sequence[list[int]], max_tokens: int,
                long_prompts: str = "error") -> tuple[list[Problem], list[list[int]]]:
    """The problems whose prompts hold at most `max_tokens` tokens, with their ids. A longer one
    is a DataError naming its row and length ("error"), or is left out with the count logged
    ("drop"); DataError as well when "drop" leaves nothing."""
    long = [(p, len(x)) for p, x in zip(problems, ids, strict=True) if len(x) > max_tokens]
    if long and long_prompts == "error":
        shown = "; ".join(f"{p.where} (id {p.id}): {n} tokens" for p, n in long[:3])
        raise DataError(f"{len(long)} of {len(problems)} prompts are longer than "
                        f"max_prompt_tokens={max_tokens}: {shown}; raise max_prompt_tokens or "
                        f"set task.long_prompts=drop")
    kept = [(p, x) for p, x in zip(problems, ids, strict=True) if len(x) <= max_tokens]
    if long:
        log.warning("left out %d of %d prompts longer than max_prompt_tokens=%d (e.g. %s, %d "
                    "tokens)", len(long), len(problems), max_tokens, long[0][0].where, long[0][1])
    if not kept:
        raise DataError(f"every one of the {len(problems)} prompts is longer than "
                        f"max_prompt_tokens={max_tokens}")
    return [p for p, _ in kept], [x for _, x in kept]


# ----------------------------------------------------------------------------- answers, rewards

# A number: a minus sign unless it follows a word character ("5-7" is 5 and 7), digits with
# thousands commas ("1,234"; "1,2,3" is three numbers), a decimal part, a denominator (ASCII).
_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?",
                     re.ASCII)


def math_answer(text: str) -> str | None:
    """A response's answer: its last boxed answer (`answers.boxed_answer`), else the last number
    it writes (`_NUMBER`; thousands commas dropped: "1,234" is 1234), else None."""
    boxed = answers.boxed_answer(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def math_correct(answer: str | None, reference: str) -> bool:
    """Whether `answer` equals `reference` by math-verify (`answers.is_correct`); False for no
    answer and where math-verify fails."""
    try:
        return answers.is_correct(answer, reference)
    except Exception as e:  # math-verify's parser errors and timeouts: not a right answer
        log.debug("math-verify failed on %r against %r: %r", answer, reference, e)
        return False


def arithmetic_correct(answer: str | None, reference: str) -> bool:
    """The arithmetic task's check: the boxed answer is exactly the integer's digits."""
    return answer is not None and answer.strip() == reference


def same_strings(found: Sequence[str | None]) -> answers.AnswerGroups:
    """Answers grouped by their stripped text (the arithmetic task's integers), in order of
    first appearance; None is no answer."""
    keys = [None if a is None else a.strip() for a in found]
    labels = list(dict.fromkeys(k for k in keys if k))
    ids = np.array([labels.index(k) if k else answers.NO_ANSWER for k in keys], np.int32)
    return answers.AnswerGroups(ids=ids, labels=tuple(labels))


class Grader(NamedTuple):
    """How a kind reads, checks and groups answers."""

    answer: Callable[[str], str | None]          # response text -> its answer
    correct: Callable[[str | None, str], bool]   # (answer, reference) -> right
    group: Callable[[Sequence[str | None]], answers.AnswerGroups]  # answers -> vote groups


GRADERS = {"math": Grader(math_answer, math_correct, answers.group_answers),
           "arithmetic": Grader(answers.boxed_answer, arithmetic_correct, same_strings)}


def accuracy_reward(grader: Grader) -> Callable[[str, str], float]:
    """1 when the response's answer is right, else 0."""
    return lambda text, reference: float(grader.correct(grader.answer(text), reference))


def format_reward(grader: Grader) -> Callable[[str, str], float]:
    """1 when the response puts an answer in `\\boxed{}`, right or wrong, else 0."""
    return lambda text, reference: float(answers.boxed_answer(text) is not None)


# name -> (a kind's grader -> (response text, reference answer) -> a number)
REWARDS: dict[str, Callable[[Grader], Callable[[str, str], float]]] = {
    "accuracy": accuracy_reward, "format": format_reward}


def weighted_reward(functions: Mapping[str, Callable[[str, str], float]],
                    weights: Mapping[str, float], decode: Callable[[list[int]], str]):
    """A `loop.RewardFn`: reward = sum_i w_i f_i(text, reference), the text decoded from the
    response's tokens, the reference the prompt's data; each f_i (weight 0 included) and the
    truncation logged apart under its own name. Names are those of `functions`; `weights` gives
    each one's weight (a name without a weight weighs 0)."""
    from jaxlab.rl import loop

    missing = sorted(set(weights) - set(functions))
    require(not missing, f"weights for reward functions that are not given: {missing}")
    reserved = sorted(set(functions) & {"reward", "truncated"})
    require(not reserved, f"reward functions may not be named {reserved}: the weighted sum and "
                          f"the truncation are logged under those names")

    def score(prompt, response: list[int], truncated: bool) -> dict[str, float]:
        text = decode(response)
        values = {name: float(f(text, prompt.data)) for name, f in functions.items()}
        reward = sum(weights.get(name, 0.0) * v for name, v in values.items())
        return {"reward": reward, **values, "truncated": float(truncated)}

    return loop.per_response(score)


def task_rewards(task: TaskConfig, decode: Callable[[list[int]], str]):
    """The task's `loop.RewardFn`: its `rewards` weights over `REWARDS` with its kind's grader;
    every named function is logged, `accuracy` always."""
    grader = GRADERS[task.kind]
    names = dict.fromkeys(["accuracy", *task.rewards])
    return weighted_reward({name: REWARDS[name](grader) for name in names}, task.rewards,
                           decode)


# ----------------------------------------------------------------------------- evaluation


def evaluate(model, prompt_ids: Sequence[Sequence[int]], references: Sequence[str],
             grader: Grader, decode: Callable[[Sequence[int]], str], *, key, stop_ids,
             max_new_tokens: int, temperature: float, samples: int = 8, top_p: float = 1.0,
             top_k: int = 0, batch: int = 64) -> dict[str, float]:
    """Held-out accuracy of `model` on problems (their prompt ids and reference answers):
    {"greedy": the share solved by the greedy response, "pass@1": the mean share of `samples`
    responses at `temperature` that are right, f"majority@{samples}": the share whose majority
    answer among those responses is right (`voting.majority_vote` over the grader's groups;
    a response without an answer does not vote)}; sampled figures only when samples > 0.
    Problems go `batch` at a time, every batch padded to the longest prompt of all (one
    compiled sampler serves every full batch)."""
    import jax

    from jaxlab.deepconf import voting
    from jaxlab.sampling import sampler

    stop_ids = tuple(int(i) for i in stop_ids)
    greedy_config = sampler.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                           stop_ids=stop_ids, confidence=False)
    greedy, right, majority = [], [], []
    longest = max((len(x) for x in prompt_ids), default=1)
    for start in range(0, len(prompt_ids), batch):
        ids = [list(x) for x in prompt_ids[start:start + batch]]
        refs = references[start:start + batch]
        out = jax.device_get(sampler.sample(model, ids, jax.random.key(0), greedy_config,
                                            max_prompt_tokens=longest))
        greedy += [grader.correct(grader.answer(decode(out.tokens[i, :out.lengths[i]])), r)
                   for i, r in enumerate(refs)]
        if not samples:
            continue
        config = dataclasses.replace(greedy_config, temperature=temperature, top_p=top_p,
                                     top_k=top_k, group_size=samples)
        out = jax.device_get(sampler.sample(model, ids, jax.random.fold_in(key, start), config,
                                            max_prompt_tokens=longest))
        for i, reference in enumerate(refs):
            rows = range(i * samples, (i + 1) * samples)
            found = [grader.answer(decode(out.tokens[j, :out.lengths[j]])) for j in rows]
            right += [grader.correct(a, reference) for a in found]
            groups = grader.group(found)
            vote = voting.majority_vote(groups.ids, groups.ids != answers.NO_ANSWER)
            majority.append(grader.correct(groups.label(int(vote.answer)), reference))
    figures = {"greedy": float(np.mean(greedy))}
    if samples:
        figures.update({"pass@1": float(np.mean(right)),
                        f"majority@{samples}": float(np.mean(majority))})
    return figures


def stop_ids(folder: str | pathlib.Path, tokenizer, setting: str = "") -> tuple[int, ...]:
    """The tokens that end a response of the checkpoint in `folder`: the `eos_token_id` of its
    generation_config.json (an id or a list: Qwen3's chat models stop at `<|im_end|>` and
    `<|endoftext|>`), then the tokenizer's EOS; DataError when there is none (naming `setting`,
    the caller's key that gives stop tokens, if it has one)."""
    from jaxlab.jsonl import read_json

    file = pathlib.Path(folder) / "generation_config.json"
    found = read_json(file).get("eos_token_id") if file.is_file() else None
    ids = [found] if isinstance(found, int) else list(found or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise DataError(f"{folder}: neither generation_config.json nor the tokenizer names an "
                        f"EOS token to end responses with"
                        + (f"; give the stop tokens as {setting}" if setting else
                           "; add eos_token_id to its generation_config.json"))
    return tuple(dict.fromkeys(int(i) for i in ids))
