import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlab.rl import reward_model as rm

VOCAB, WIDTH = 12, 8


class EmbedOnly(nnx.Module):
    """A position-wise backbone: the reward then depends on the last real token alone."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)

    def hidden(self, tokens, mask):
        return self.embed(tokens)


def embed_only_model(seed=0):
    rngs = nnx.Rngs(seed)
    return rm.ScalarRewardModel(EmbedOnly(rngs), WIDTH, rngs=rngs)


def test_reward_head_on_a_loaded_decoder_ignores_padding(tmp_path):
    """On a checkpoint's decoder, r(x, y) reads the hidden state of the last real token, equal
    to that of the full forward pass of the unpadded sequence, whatever the padding."""
    from jaxlab.models import hf, zoo

    decoder = hf.load_pretrained(zoo.create("qwen3", tmp_path, vocab_size=VOCAB))
    model = rm.ScalarRewardModel(decoder, decoder.config.hidden_size, rngs=nnx.Rngs(0))
    tokens = jnp.array([[0, 0, 4, 9, 2, 0], [3, 5, 7, 1, 8, 6]])
    mask = jnp.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])      # padded on both sides
    alone = model(jnp.array([[4, 9, 2]]), jnp.ones((1, 3)))
    rewards = model(tokens, mask)
    np.testing.assert_allclose(rewards[0], alone[0], rtol=1e-5, atol=1e-6)
    hidden = decoder.hidden(tokens[1:], mask[1:])[0, -1]
    np.testing.assert_allclose(rewards[1], model.head(hidden)[0], rtol=1e-6)


def test_bt_loss_and_accuracy_hand_computed():
    chosen, rejected = jnp.array([2.0, 0.0, 1.0]), jnp.array([0.0, 0.0, 3.0])
    want = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    np.testing.assert_allclose(rm.bt_loss(chosen, rejected), want, rtol=1e-6)
    np.testing.assert_allclose(rm.bt_accuracy(chosen, rejected), 1 / 3)  # a tie is not a win


def test_bt_loss_is_finite_for_huge_gaps():
    loss, grad = jax.value_and_grad(rm.bt_loss)(jnp.array([-1e4, 1e4]), jnp.array([1e4, -1e4]))
    np.testing.assert_allclose(loss, 1e4, rtol=1e-6)
    assert np.isfinite(grad).all()


def test_reward_reads_the_last_real_token():
    model = embed_only_model()
    tokens = jnp.array([[3, 5, 7, 0, 0], [0, 0, 4, 9, 2], [6, 0, 0, 0, 0]])
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])  # right/left padded
    last = jnp.array([[7], [2], [6]])
    np.testing.assert_allclose(model(tokens, mask), model(last, jnp.ones((3, 1))), rtol=1e-6)
    changed_padding = tokens.at[0, 3:].set(11).at[1, :2].set(11)
    np.testing.assert_array_equal(model(changed_padding, mask), model(tokens, mask))


def test_bradley_terry_training_learns_a_preference():
    # Humans prefer responses that end with token 1 over those that end with token 2.
    model = embed_only_model(seed=1)
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    prefix = jnp.asarray(rng.integers(3, VOCAB, (32, 4)))
    chosen = jnp.concatenate([prefix, jnp.ones((32, 1), prefix.dtype)], axis=1)
    rejected = chosen.at[:, -1].set(2)
    mask = jnp.ones_like(chosen)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return rm.bt_loss(model(chosen, mask), model(rejected, mask))
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    first = step(model, optimizer)
    for _ in range(30):
        last = step(model, optimizer)
    assert last < 0.1 < first
    assert rm.bt_accuracy(model(chosen, mask), model(rejected, mask)) == 1.0


def test_filter_pairs_matches_numpy():
    rng = np.random.default_rng(0)
    chosen = rng.normal(size=1000).astype(np.float32)
    rejected = chosen - rng.exponential(1.0, size=1000).astype(np.float32) + 0.3
    config = rm.PairFilter(chosen_quantile=0.8, min_gap=0.5)
    keep, counts = jax.jit(rm.filter_pairs, static_argnums=2)(chosen, rejected, config)
    high = chosen >= np.quantile(chosen, 0.8)
    gap = chosen - rejected >= 0.5
    np.testing.assert_array_equal(keep, high & gap)
    assert counts == (1000, high.sum(), gap.sum(), (high & gap).sum())
    assert 150 < counts.high_chosen <= 200 and 0 < counts.kept < counts.high_chosen


def test_filter_pairs_hand_computed():
    chosen = jnp.array([1.0, 2.0, 3.0, 4.0])
    rejected = jnp.array([0.0, 1.9, 0.0, 3.5])
    keep, counts = rm.filter_pairs(chosen, rejected, rm.PairFilter(chosen_quantile=0.5,
                                                                   min_gap=1.0))
    # median 2.5: pairs 2 and 3 are high; gaps 1, 0.1, 3, 0.5: pairs 0 and 2 are large.
    np.testing.assert_array_equal(keep, [False, False, True, False])
    assert tuple(int(c) for c in counts) == (4, 2, 2, 1)


@pytest.mark.parametrize("chosen,rejected", [(jnp.zeros(3), jnp.zeros(4)),
                                             (jnp.zeros((3, 1)), jnp.zeros((3, 1)))])
def test_bad_pair_shapes_are_named(chosen, rejected):
    for fn in (rm.bt_loss, rm.bt_accuracy, rm.filter_pairs):
        with pytest.raises(ValueError, match="chosen and rejected"):
            fn(chosen, rejected)


def test_bad_filter_and_mask_are_named():
    with pytest.raises(ValueError, match="chosen_quantile"):
        rm.PairFilter(chosen_quantile=1.5)
    with pytest.raises(ValueError, match="mask"):
        embed_only_model()(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))


# ---------------------------------------------------------------- data, loss, save / load

def write_lines(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"prompt": "p", "chosen": "good", "rejected": "bad"}


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "p", "chosen": "good"}, "pairs.jsonl:2: field 'rejected' is missing"),
    ({"prompt": "p", "chosen": " ", "rejected": "bad"}, "pairs.jsonl:2: field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"},
     "pairs.jsonl:2: chosen equals rejected"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "pairs.jsonl:2: field 'prompt'"),
])
def test_bad_preference_records_are_named_by_file_and_line(tmp_path, bad, match):
    path = write_lines(tmp_path / "pairs.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=match):
        rm.read_pairs(path)


def test_preference_pairs_read_from_jsonl_parquet_and_a_datasets_folder(tmp_path):
    import datasets

    records = [GOOD, {"prompt": "q", "chosen": "x", "rejected": "y", "extra": 1}]
    want = [{k: r[k] for k in rm.PAIR_FIELDS} for r in records]
    assert rm.read_pairs(write_lines(tmp_path / "p.jsonl", records)) == want
    table = datasets.Dataset.from_list(want)
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.save_to_disk(str(tmp_path / "folder"))
    assert rm.read_pairs(tmp_path / "p.parquet") == want
    assert rm.read_pairs(tmp_path / "folder") == want
    bad = datasets.Dataset.from_list([GOOD, {**GOOD, "rejected": "good"}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: chosen equals rejected"):
        rm.read_pairs(tmp_path / "bad.parquet")


class LastToken(nnx.Module):
    """r = the last real token's id (a fake RM with hand-computable rewards)."""

    def __call__(self, tokens, mask):
        last = jnp.max(jnp.where(mask > 0, jnp.arange(tokens.shape[1]), 0), axis=1)
        return jnp.take_along_axis(tokens, last[:, None], axis=1)[:, 0].astype(jnp.float32)


def test_pair_batch_and_pair_loss_hand_computed():
    batch = rm.pair_batch([[1], [2, 3]], [[4, 5], [6]], [[2], [9, 1]], length=4)
    np.testing.assert_array_equal(batch["chosen_tokens"], [[1, 4, 5, 0], [2, 3, 6, 0]])
    np.testing.assert_array_equal(batch["rejected_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    loss, metrics = rm.pair_loss(LastToken(), jax.tree.map(jnp.asarray, batch))
    # rewards: chosen (5, 6), rejected (2, 1): -mean(log sigmoid(3), log sigmoid(5))
    want = -(math.log(1 / (1 + math.exp(-3))) + math.log(1 / (1 + math.exp(-5)))) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(metrics["accuracy"]) == 1.0
    with pytest.raises(ValueError, match="pair 1: prompt \\+ chosen has 5 tokens"):
        rm.pair_batch([[1], [2, 3, 4, 5]], [[4], [6]], [[2], [9]], length=4)


def test_a_saved_reward_model_loads_back_with_the_same_rewards(tmp_path):
    from jaxlab.models import hf
    from jaxlab.models.decoder import Decoder
    from tests.rl.loop_job import CONFIG

    decoder = Decoder(CONFIG, nnx.Rngs(0))
    hf.save_pretrained(decoder, tmp_path / "base")
    model = rm.ScalarRewardModel(decoder, decoder.config.hidden_size, rngs=nnx.Rngs(3))
    rm.save(model, tmp_path / "rm")
    back = rm.load(tmp_path / "rm")
    tokens = np.asarray([[3, 4, 5, 0], [7, 1, 2, 9]], np.int32)
    mask = np.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    np.testing.assert_array_equal(rm.rewards(back, tokens, mask, batch_size=3),
                                  rm.rewards(model, tokens, mask, batch_size=3))
    with pytest.raises(ValueError, match="not a reward model folder"):
        rm.load(tmp_path / "base")
