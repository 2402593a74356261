"""The small writing world: a task, its hidden rubric, and preference pairs drawn from it.

A prompt asks for a text about three required topic words; a response is a sequence of words
ending (ideally) with "." and nothing after it:

    prompt:    write sun river night :
    response:  the sun over the river in the night .            (then EOS)

The answer proper is the words before the first "."; any words after it are redundant
self-explanation ("note this text covers ..."), the reward hack Writing-Zero reports for the
scalar-RM writer (section 3 of `papers/writing_zero.md`). The hidden true quality is a rubric
that no model sees, an integer in [0, 10]:

    coverage  0..4  round(4 c / 3), c = required words in the answer proper
    repeats   0..2  2 without a repeated bigram or a word used 3+ times, 1 with one repeated
                    bigram and no word used 3+ times, else 0
    length    0..2  2 if the answer's word count lies in the band, 1 within `slack` of it, else 0
    ending    0..2  2 for "." with nothing after it, 1 for "." followed by words, 0 without "."

Preference pairs (two responses to one prompt) are labelled by a noisy rater with a length
confound: P(a chosen over b) = sigmoid((q_a - q_b) / temperature + length_bias (n_a - n_b))
with n the response's word count, then the label is flipped with probability `label_noise`.

Text is tokenized one word per token with a fixed vocabulary (`tokenizer` builds a Hugging
Face fast tokenizer for it, saved with every model of the world so that a GenRM's and a
writer's vocabularies can be compared).
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

from jaxlab.config import require, require_positive_ints

PAD, EOS = "<pad>", "<eos>"
TOPICS = ("sun", "moon", "river", "tree", "stone", "wind", "fire", "rain", "snow", "bird",
          "fish", "cloud", "hill", "road", "night", "light", "sea", "star", "leaf", "sky")
FILLERS = ("the", "a", "and", "of", "in", "on", "with", "over", "under", "bright", "quiet",
           "old")
STOP = "."
EXPLAIN = ("note", "this", "text", "covers", "all", "words", "as", "asked")
PROMPT_WORDS = ("write", ":")
JUDGE_WORDS = ("query", "first", "second", "verdict", "coverage", "repeats", "length", "ending",
               "total", ";", "\\boxed{", ",", "}")
NUMBERS = tuple(str(i) for i in range(11))
VOCAB = (PAD, EOS, *TOPICS, *FILLERS, STOP, *EXPLAIN, *PROMPT_WORDS, *JUDGE_WORDS, *NUMBERS)
CRITERIA = ("coverage", "repeats", "length", "ending")
_INDEX = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, EOS_ID = _INDEX[PAD], _INDEX[EOS]


@dataclasses.dataclass(frozen=True)
class Rubric:
    """The hidden quality's settings."""

    band: tuple[int, int] = (6, 12)  # answer word counts that earn the full length score
    slack: int = 3                   # ... and within this many words of it, half

    def __post_init__(self):
        require(0 < self.band[0] <= self.band[1],
                f"Rubric.band must be (low, high) with 0 < low <= high, got {self.band}")
        require(self.slack >= 0, f"Rubric.slack must be >= 0, got {self.slack}")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """How responses and preference labels are drawn."""

    required: int = 3            # topic words a prompt asks for
    max_words: int = 18          # longest answer proper the response generator draws
    stop_rate: float = 0.85      # responses ending with "."
    tail_rate: float = 0.35      # ... of those, followed by an explanation of 2-8 words
    repeat_rate: float = 0.3     # responses with a repeated bigram appended
    temperature: float = 1.0     # rater: quality differences are divided by this
    length_bias: float = 0.25    # rater: + this x (word count difference) in the logit
    label_noise: float = 0.1     # rater: labels flipped with this probability
    rubric: Rubric = dataclasses.field(default_factory=Rubric)

    def __post_init__(self):
        require_positive_ints(self, "required", "max_words")
        require(self.required <= len(TOPICS), f"WorldConfig.required must be <= {len(TOPICS)}")
        for name in ("stop_rate", "tail_rate", "repeat_rate", "label_noise"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"WorldConfig.{name} must lie in [0, 1], got {value}")
        require(self.temperature > 0,
                f"WorldConfig.temperature must be > 0, got {self.temperature}")

    @property
    def max_response_words(self) -> int:
        """The longest response the generator draws (answer, repeat, ".", explanation)."""
        return self.max_words + self.required + 2 + 1 + 8


# --------------------------------------------------------------------------------------------
# Text and tokens


def encode(text: str) -> list[int]:
    """Word ids of `text` (space-separated words of the vocabulary)."""
    words = text.split()
    unknown = sorted({w for w in words if w not in _INDEX})
    require(not unknown, f"words {unknown} are not in the writing world's vocabulary")
    return [_INDEX[w] for w in words]


def decode(ids: Sequence[int]) -> str:
    """Text of token ids, without padding and EOS."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) not in (PAD_ID, EOS_ID))


def tokenizer():
    """A transformers fast tokenizer for `VOCAB`, one token per space-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(dict(_INDEX), unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS)


def save_tokenizer(path: str | pathlib.Path) -> None:
    tokenizer().save_pretrained(path)


def prompt_text(required: Sequence[str]) -> str:
    return " ".join(["write", *required, ":"])


def required_words(prompt: str) -> tuple[str, ...]:
    """The topic words a prompt text asks for."""
    words = prompt.split()
    require(len(words) >= 3 and words[0] == "write" and words[-1] == ":",
            f"not a writing-world prompt: {prompt!r}")
    return tuple(words[1:-1])


# --------------------------------------------------------------------------------------------
# The rubric


def split_answer(words: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """(answer proper, redundant tail, ended): the words before the first ".", those after it,
    and whether there is a "."."""
    words = list(words)
    if STOP not in words:
        return words, [], False
    end = words.index(STOP)
    return words[:end], words[end + 1:], True


def criteria(required: Sequence[str], response: str, rubric: Rubric = Rubric()
             ) -> dict[str, int]:
    """The rubric's four integer scores of a response (module docstring)."""
    answer, tail, ended = split_answer(response.split())
    covered = len(set(required) & set(answer))
    bigrams = Counter(itertools.pairwise(answer))
    repeated_bigrams = sum(c - 1 for c in bigrams.values() if c > 1)
    overused = any(c >= 3 for c in Counter(answer).values())
    low, high = rubric.band
    distance = max(low - len(answer), len(answer) - high, 0)
    return {
        "coverage": round(4 * covered / len(required)),
        "repeats": 0 if overused or repeated_bigrams > 1 else 2 - repeated_bigrams,
        "length": 2 if distance == 0 else int(distance <= rubric.slack),
        "ending": 0 if not ended else 1 if tail else 2,
    }


def quality(required: Sequence[str], response: str, rubric: Rubric = Rubric()) -> int:
    """The hidden true quality in [0, 10]: the sum of `criteria`."""
    return sum(criteria(required, response, rubric).values())


def redundant_words(response: str) -> int:
    """Words after the answer proper (the redundant self-explanation)."""
    return len(split_answer(response.split())[1])


def distinct_bigrams(response: str) -> float:
    """Distinct bigrams / bigrams of the whole response (1 for fewer than two words): the
    repetition measure, lower is more repetitive."""
    words = response.split()
    pairs = list(itertools.pairwise(words))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


# --------------------------------------------------------------------------------------------
# Drawing prompts, responses and preference pairs


def draw_required(rng: np.random.Generator, config: WorldConfig) -> tuple[str, ...]:
    return tuple(rng.choice(TOPICS, config.required, replace=False).tolist())


def draw_response(rng: np.random.Generator, required: Sequence[str], config: WorldConfig
                  ) -> str:
    """A response of varied quality: random words with each required word inserted with a
    per-response probability, sometimes a repeated bigram, usually ".", sometimes an
    explanation after it."""
    words = rng.choice(TOPICS + FILLERS, rng.integers(2, config.max_words + 1)).tolist()
    cover = rng.uniform()
    for word in required:
        if rng.uniform() < cover:
            words.insert(int(rng.integers(0, len(words) + 1)), word)
    if rng.uniform() < config.repeat_rate:
        start = int(rng.integers(0, len(words) - 1))
        words += words[start:start + 2]
    if rng.uniform() < config.stop_rate:
        words.append(STOP)
        if rng.uniform() < config.tail_rate:
            words += rng.choice(EXPLAIN, rng.integers(2, 9)).tolist()
    return " ".join(words)


def rater_prefers_first(rng: np.random.Generator, required: Sequence[str], a: str, b: str,
                        config: WorldConfig) -> bool:
    """The noisy, length-confounded rater (module docstring): True if `a` is chosen."""
    logit = ((quality(required, a, config.rubric) - quality(required, b, config.rubric))
             / config.temperature + config.length_bias * (len(a.split()) - len(b.split())))
    first = rng.uniform() < 1 / (1 + np.exp(-logit))
    return bool(first != (rng.uniform() < config.label_noise))


def preference_pairs(count: int, seed: int, config: WorldConfig, rater: bool = True,
                     ) -> list[dict]:
    """`count` records {prompt, chosen, rejected}: two different responses to one prompt,
    labelled by the rater (`rater=True`) or by the true quality (`rater=False`: chosen has the
    strictly higher quality; ties are redrawn)."""
    rng = np.random.default_rng(seed)
    records = []
    while len(records) < count:
        required = draw_required(rng, config)
        a, b = draw_response(rng, required, config), draw_response(rng, required, config)
        qa, qb = quality(required, a, config.rubric), quality(required, b, config.rubric)
        if a == b or (not rater and qa == qb):
            continue
        first = rater_prefers_first(rng, required, a, b, config) if rater else qa > qb
        chosen, rejected = (a, b) if first else (b, a)
        records.append({"prompt": prompt_text(required), "chosen": chosen,
                        "rejected": rejected})
    return records


def longer_side(pair: dict) -> int:
    """+1 if the pair's chosen response has more words than its rejected one, -1 if fewer, 0 for
    equal counts."""
    return int(np.sign(len(pair["chosen"].split()) - len(pair["rejected"].split())))


def quality_gap(pair: dict, rubric: Rubric = Rubric()) -> int:
    """q(chosen) - q(rejected) by the hidden rubric."""
    required = required_words(pair["prompt"])
    return quality(required, pair["chosen"], rubric) - quality(required, pair["rejected"], rubric)


def pair_key(pair: dict) -> tuple[str, frozenset[str]]:
    """A pair's identity whatever its order: its prompt and its two responses."""
    return pair["prompt"], frozenset((pair["chosen"], pair["rejected"]))


def judge_pairs(count: int, seed: int, config: WorldConfig, small_gaps: bool = False,
                exclude: Sequence[dict] = ()) -> list[dict]:
    """`count` pairs labelled by the true quality (chosen strictly better; `preference_pairs`
    with `rater=False`), balanced against the length confound: a pair whose better response is
    the longer one (or the shorter one) is taken only while that side is not ahead of the other,
    so the longer text is the better one in half of the pairs of unequal length (37% of the
    generator's pairs). `small_gaps`: a drawn pair is taken with probability 1 / its quality
    gap, weighting the pairs to small gaps (the hard ones). Pairs of `exclude` (in either
    order) are never drawn."""
    rng = np.random.default_rng(seed)
    records, sides = [], {1: 0, -1: 0}
    skip = {pair_key(p) for p in exclude}
    batch = 0
    while len(records) < count:
        for pair in preference_pairs(4 * count, seed * 1_000 + batch, config, rater=False):
            side = longer_side(pair)
            if pair_key(pair) in skip:
                continue
            if side and sides[side] > sides[-side]:
                continue
            if small_gaps and rng.uniform() * quality_gap(pair, config.rubric) > 1:
                continue
            sides[side] = sides.get(side, 0) + 1
            skip.add(pair_key(pair))
            records.append(pair)
            if len(records) == count:
                break
        batch += 1
    return records


def ideal_rater_reward(required: Sequence[str], response: str, config: WorldConfig) -> float:
    """The reward of an ideal rater-RM, r = q / temperature + length_bias n (n the word count):
    its Bradley-Terry probability sigmoid(r_a - r_b) is the rater's before the label noise, so
    no reward model learned from the rater's labels can do better (length confound included)."""
    return (quality(required, response, config.rubric) / config.temperature
            + config.length_bias * len(response.split()))


def writer_examples(count: int, seed: int, config: WorldConfig) -> list[dict]:
    """`count` records {prompt, response} from the response generator: the initial writer's
    supervised data (mixed quality, so both RL methods have room to move)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        required = draw_required(rng, config)
        records.append({"prompt": prompt_text(required),
                        "response": draw_response(rng, required, config)})
    return records


# --------------------------------------------------------------------------------------------
# Models of the world


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A small Qwen3-architecture decoder over the world's vocabulary."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4

    def __post_init__(self):
        require_positive_ints(self, "hidden_size", "layers", "heads")
        require(self.hidden_size % self.heads == 0,
                f"ModelSize.hidden_size={self.hidden_size} must be a multiple of heads")

    def decoder_config(self):
        from jaxlab.models import zoo
        from jaxlab.models.decoder import DecoderConfig

        config = zoo.hf_config(
            "qwen3", vocab_size=len(VOCAB), hidden_size=self.hidden_size,
            intermediate_size=3 * self.hidden_size, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=max(1, self.heads // 2),
            head_dim=self.hidden_size // self.heads, max_position_embeddings=256,
            tie_word_embeddings=True)
        return DecoderConfig.from_hf(config)


def save_model(model, path: str | pathlib.Path) -> None:
    """A world decoder as a Hugging Face folder with the world's tokenizer and its generation
    config (`hf.save_policy`)."""
    from jaxlab.models import hf

    hf.save_policy(model, path, tokenizer(), eos_token_id=EOS_ID, pad_token_id=PAD_ID)
