"""The scalar Bradley-Terry reward model of Writing-Zero (section 1 of `papers/writing_zero.md`):
used to filter the GenRM's training pairs and, in the ScalarRM-GRPO baseline, as the writer's
reward (section 3).

    P(y_chosen > y_rejected | x) = sigmoid(r(x, y_chosen) - r(x, y_rejected))
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import jsonl, parallel, results
from jaxlab.config import require
from jaxlab.jsonl import DataError


class ScalarRewardModel(nnx.Module):
    """r(x, y): a linear head on the backbone's hidden state at the sequence's last real token.

    The backbone is a `jaxlab.models.Decoder` loaded from any causal-LM checkpoint, or any Flax
    NNX module with its method `hidden(tokens int [B, T], mask [B, T]) -> [B, T, D]`.
    """

    def __init__(self, backbone: nnx.Module, hidden_size: int, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array, *, remat: str = "none",
                 ) -> jax.Array:
        """Rewards float32 [B] of tokens int [B, T] whose real positions are mask [B, T] (each
        row with at least one); `remat`: the backbone layers' checkpoint policy for a gradient
        (`Decoder.hidden`; "none" calls `hidden` without it, as any backbone takes)."""
        require(tokens.shape == mask.shape,
                f"tokens {tokens.shape} and mask {mask.shape} must have equal shapes")
        hidden = (self.backbone.hidden(tokens, mask) if remat == "none"
                  else self.backbone.hidden(tokens, mask, remat=remat))  # [B, T, D]
        positions = jnp.arange(tokens.shape[1])
        last = jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)  # [B]
        final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.head(final.astype(jnp.float32))[:, 0]


def _check_pair(chosen: jax.Array, rejected: jax.Array) -> None:
    require(chosen.ndim == 1 and chosen.shape == rejected.shape,
            f"chosen and rejected rewards must both have shape [N], got {chosen.shape} and "
            f"{rejected.shape}")


def bt_loss(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """Bradley-Terry loss: mean_n -log sigmoid(r_chosen,n - r_rejected,n). [] from [N], [N]."""
    _check_pair(chosen, rejected)
    return -jnp.mean(jax.nn.log_sigmoid(chosen - rejected))


def bt_accuracy(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """The fraction of pairs whose chosen response gets the strictly higher reward. []."""
    _check_pair(chosen, rejected)
    return jnp.mean((chosen > rejected).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class PairFilter:
    """Which preference pairs to keep for GenRM training (section 1: a high chosen reward and a
    large reward gap; the paper keeps ~10K of ~200K pairs but gives no thresholds)."""

    chosen_quantile: float = 0.5  # keep pairs whose chosen reward is >= this quantile of all
    min_gap: float = 1.0          # ... and whose reward gap r_chosen - r_rejected is >= this

    def __post_init__(self):
        require(0 <= self.chosen_quantile <= 1,
                f"PairFilter.chosen_quantile must lie in [0, 1], got {self.chosen_quantile}")


class FilterCounts(NamedTuple):
    total: jax.Array        # [] int32, pairs seen
    high_chosen: jax.Array  # [] int32, pairs passing the chosen-reward quantile
    large_gap: jax.Array    # [] int32, pairs passing the gap threshold
    kept: jax.Array         # [] int32, pairs passing both


def filter_pairs(chosen: jax.Array, rejected: jax.Array, config: PairFilter = PairFilter(),
                 ) -> tuple[jax.Array, FilterCounts]:
    """keep_n = r_chosen,n >= quantile_q(r_chosen) and r_chosen,n - r_rejected,n >= min_gap.

    Args:
      chosen, rejected: [N] rewards of each pair's chosen and rejected response.
    Returns:
      keep bool [N] and the counts behind it.
    """
    _check_pair(chosen, rejected)
    high = chosen >= jnp.quantile(chosen, config.chosen_quantile)
    gap = chosen - rejected >= config.min_gap
    keep = high & gap
    counts = FilterCounts(*(jnp.sum(m, dtype=jnp.int32) for m in (jnp.ones_like(keep), high,
                                                                    gap, keep)))
    return keep, counts


# --------------------------------------------------------------------------------------------
# Preference data, training, saving, and the writer's reward


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def read_table(path: str | pathlib.Path, fields: Sequence[str], what: str,
               ) -> list[dict[str, str]]:
    """Records with the string `fields` from a JSON Lines file, a parquet file or a Hugging
    Face `datasets` folder (`save_to_disk`), each with its place (`file:line` for JSON Lines,
    `file: row n` otherwise) under "at". A file or folder that cannot be read, a record that is
    not an object, or one whose field is missing or not a string is a DataError naming it; an
    empty source names `what`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if path.is_dir() or path.suffix == ".parquet":
        rows = [(f"{path}: row {n}", row) for n, row in enumerate(_table_rows(path), 1)]
    else:
        rows = [(f"{path}:{n}", row) for n, row in enumerate(jsonl.read_records(path), 1)]
    for at, row in rows:
        bad = [field for field in fields if not isinstance(row.get(field), str)]
        if bad:
            raise DataError(f"{at}: field {bad[0]!r} is missing or not a string")
    if not rows:
        raise DataError(f"{path} holds no {what}")
    return [{**{field: row[field] for field in fields}, "at": at} for at, row in rows]


def _table_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a parquet file or a `datasets` folder; DataError naming `path` (and a damaged
    JSON file of the folder with its line) when it cannot be read."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    what = "a datasets folder (Dataset.save_to_disk)" if path.is_dir() else "a parquet file"
    for file in sorted(path.rglob("*.json")) if path.is_dir() else ():
        jsonl.read_json(file)  # state.json, dataset_info.json, dataset_dict.json
    try:
        if not path.is_dir():
            return pq.read_table(path).to_pylist()
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            raise DataError(f"{path} holds the splits {sorted(table)} of a DatasetDict; give "
                            f"the folder of one split, e.g. {path / next(iter(table))}")
        return table.to_list()
    except DataError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        raise DataError(f"{path}: not readable as {what} ({type(e).__name__}: {e})"
                        + (f"; the folder holds {held}" if held is not None else "")
                        + "; write it again, or restore it from its source") from None


def read_pairs(path: str | pathlib.Path) -> list[dict[str, str]]:
    """Preference pairs {prompt, chosen, rejected} (`read_table`). A record with a missing or
    non-string field, an empty response, or chosen equal to rejected is a DataError naming it
    (`file:line` for JSON Lines, `file: row n` otherwise)."""
    pairs = []
    for record in read_table(path, PAIR_FIELDS, "preference pairs"):
        at = record.pop("at")
        empty = [field for field in ("chosen", "rejected") if not record[field].strip()]
        if empty:
            raise DataError(f"{at}: field {empty[0]!r} is empty")
        if record["chosen"] == record["rejected"]:
            raise DataError(f"{at}: chosen equals rejected ({record['chosen'][:60]!r})")
        pairs.append(record)
    return pairs


def pair_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
               rejected: Sequence[Sequence[int]], length: int) -> dict[str, np.ndarray]:
    """Rows prompt + response, right-padded to `length`: {chosen,rejected}_{tokens,mask} int32
    [N, length] each (a row longer than `length` is an error naming it)."""
    out = {}
    for name, responses in (("chosen", chosen), ("rejected", rejected)):
        tokens = np.zeros((len(prompts), length), np.int32)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            n = len(prompt) + len(response)
            require(n <= length, f"pair {row}: prompt + {name} has {n} tokens > length {length}")
            tokens[row, :n] = [*prompt, *response]
        out[f"{name}_tokens"] = tokens
        out[f"{name}_mask"] = np.asarray(
            np.arange(length) < np.asarray([len(p) + len(r) for p, r in zip(
                prompts, responses, strict=True)])[:, None], np.int32)
    return out


def pair_loss(model: ScalarRewardModel, batch, *, remat: str = "none",
              ) -> tuple[jax.Array, dict]:
    """`bt_loss` of a `pair_batch` (the loss `sft.fit` trains the RM on), with its accuracy."""
    rows = (jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]),
            jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]))
    rewards = model(*rows) if remat == "none" else model(*rows, remat=remat)        # [2B]
    chosen, rejected = jnp.split(rewards, 2)
    loss = bt_loss(chosen, rejected)
    return loss, {"loss": loss, "accuracy": bt_accuracy(chosen, rejected)}


@functools.partial(jax.jit, static_argnames="graphdef")
def _rewards(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, mask)


def rewards(model: ScalarRewardModel, tokens: np.ndarray, mask: np.ndarray,
            batch_size: int = 256) -> np.ndarray:
    """r(x, y) float32 [N] of rows tokens, mask int [N, T], in jitted batches (the last one
    padded, so one shape is compiled)."""
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(tokens), batch_size):
        part_t, part_m = tokens[start:start + batch_size], mask[start:start + batch_size]
        pad = batch_size - len(part_t)
        part_t = np.pad(part_t, ((0, pad), (0, 0)))
        part_m = np.pad(part_m, ((0, pad), (0, 0)), constant_values=1)
        out.append(np.asarray(_rewards(graphdef, state, part_t, part_m))[:batch_size - pad])
    return np.concatenate(out)


HEAD_FILE = "reward_head.safetensors"


def save(model: ScalarRewardModel, path: str | pathlib.Path, **config_fields) -> None:
    """The RM as a folder: the backbone as a Hugging Face causal-LM checkpoint
    (`hf.save_pretrained`: config.json, model.safetensors) and the head in `reward_head.
    safetensors` (`weight` float32 [D, 1], `bias` float32 [1]): r = h_last @ weight + bias.
    With several processes, process 0 writes and the others wait."""
    from safetensors.numpy import save_file

    from jaxlab.models import hf

    hf.save_pretrained(model.backbone, path, **config_fields)
    head = {"weight": parallel.host_array(model.head.kernel[...]),   # on every process
            "bias": parallel.host_array(model.head.bias[...])}
    target = pathlib.Path(path) / HEAD_FILE
    results.write_once(lambda: save_file(head, str(target)), target)   # process 0 writes


def load(path: str | pathlib.Path, **load_options) -> ScalarRewardModel:
    """The RM `save` wrote (`load_options` go to `hf.load_pretrained`)."""
    from safetensors.numpy import load_file

    from jaxlab.models import hf

    head_file = pathlib.Path(path) / HEAD_FILE
    require(head_file.is_file(), f"{path} has no {HEAD_FILE}: not a reward model folder")
    backbone = hf.load_pretrained(path, **load_options)
    model = ScalarRewardModel(backbone, backbone.config.hidden_size, rngs=nnx.Rngs(0))
    head = load_file(str(head_file))
    require(head["weight"].shape == model.head.kernel.shape,
            f"{head_file}: weight has shape {head['weight'].shape}, the backbone needs "
            f"{model.head.kernel.shape}")
    model.head.kernel[...] = jnp.asarray(head["weight"])
    model.head.bias[...] = jnp.asarray(head["bias"])
    return model


def scalar_reward_fn(model: ScalarRewardModel,
                     render: Callable[[object, list[int]], list[int]], length: int):
    """The writer's reward function for ScalarRM-GRPO (`loop.run`, section 3): r(x, y) of each
    response, with `render(prompt, response tokens)` the RM's input tokens (at most `length`)."""
    def reward_fn(prompts, responses, truncated):
        rows = [render(p, r) for p, group in zip(prompts, responses, strict=True)
                for r in group]
        tokens = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            require(len(row) <= length, f"the RM input of response {i} has {len(row)} tokens "
                                        f"> length {length}")
            tokens[i, :len(row)] = row
        mask = (np.arange(length) < np.asarray([len(r) for r in rows])[:, None]).astype(np.int32)
        return rewards(model, tokens, mask).reshape(truncated.shape)
    return reward_fn
