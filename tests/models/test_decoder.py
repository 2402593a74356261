"""Our decoder against transformers' PyTorch models, on random-init small configs per family."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlab.models import attention, hf, zoo  # noqa: E402
from jaxlab.models.decoder import Decoder, DecoderConfig  # noqa: E402

# One variant per family, covering tied/untied embeddings, Qwen2's biases, Qwen3's q/k norms,
# Llama's attention bias and llama3 RoPE scaling.
VARIANTS = {
    "qwen3": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),
    "llama": dict(tie_word_embeddings=False, attention_bias=True),
}


def _reference(family, path, seed=0):
    """A transformers model with every weight random (norms and biases too), saved to `path`."""
    torch.manual_seed(seed)
    config = zoo.hf_config(family, **VARIANTS[family])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = _reference(request.param, path)
    return request.param, path, reference, hf.load_pretrained(path)


def _ids(batch, length, seed=0, vocab=512):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _torch_logits(model, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions))
    return out.logits.float().numpy()


def test_full_forward_matches_transformers(pair):
    _, _, reference, model = pair
    ids = _ids(2, 24)
    np.testing.assert_allclose(model(jnp.asarray(ids)), _torch_logits(reference, ids), atol=1e-4)


def test_left_padding_matches_transformers_and_the_unpadded_row(pair):
    _, _, reference, model = pair
    ids = _ids(3, 20, seed=1)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :19] = 0
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = _torch_logits(reference, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)
    alone = np.asarray(model(jnp.asarray(ids[1:2, 7:])))
    np.testing.assert_allclose(ours[1, 7:], alone[0], atol=1e-5)


@pytest.mark.parametrize("key_layout", attention.KEY_LAYOUTS)
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scanned"])
def test_prefill_then_decode_equals_full_forward(pair, key_layout, stacked):
    _, _, _, model = pair
    ids = _ids(2, 16, seed=2)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    logits, cache = model.prefill(jnp.asarray(ids[:, :10]), jnp.asarray(mask[:, :10]),
                                  cache_size=32, key_layout=key_layout, scan_layers=stacked)
    assert cache.stacked == stacked
    real = mask[:, :10].astype(bool)  # padding positions hold no meaningful logits
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :10][real], atol=1e-5)
    decode = jax.jit(lambda tokens, cache: model.decode(tokens, cache))
    for t in range(10, 16):
        step, cache = decode(jnp.asarray(ids[:, t]), cache)
        np.testing.assert_allclose(step, full[:, t], atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scanned"])
def test_a_16_bit_cache_holds_bits_and_decodes_as_a_cache_of_floats(pair, stacked, dtype):
    # under the CPU policy a 16-bit float cache is held as its bit patterns (uint16), which a
    # loop writes in place: its steps are those of the same cache held as floats, and near the
    # full forward
    _, path, _, _ = pair
    half = hf.load_pretrained(path, param_dtype=dtype).set_backend("cpu")
    ids = jnp.asarray(_ids(2, 14, seed=3))
    full = np.asarray(half(ids))
    _, bits = half.prefill(ids[:, :8], cache_size=16, scan_layers=stacked)
    floats = bits.as_floats()
    assert {x.dtype for x in jax.tree.leaves(bits.fields)} == {jnp.dtype(jnp.uint16)}
    assert {x.dtype for x in jax.tree.leaves(floats.fields)} == {jnp.dtype(dtype)}
    decode = jax.jit(lambda tokens, cache: half.decode(tokens, cache))
    for t in range(8, 14):
        step, bits = decode(ids[:, t], bits)
        same, floats = decode(ids[:, t], floats)
        np.testing.assert_array_equal(step, same)
        np.testing.assert_allclose(step, full[:, t], atol=0.05)
    for a, b in zip(jax.tree.leaves(bits.as_floats().fields), jax.tree.leaves(floats.fields),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="float32"):  # queries of another dtype: which floats?
        bits.attend(0, jnp.zeros((2, half.config.num_kv_heads, 1, half.config.head_dim)),
                    half.backend)


@pytest.mark.parametrize("dtype,eps", [("float32", 1e-6), ("bfloat16", 2**-7)])
def test_linear_layers_give_the_values_and_gradients_of_the_plain_product(dtype, eps):
    # under the CPU policy the layers multiply rows [N, E], and 16-bit floats into float32
    # and rounded (`decoder.row_dot_general`): against float64 NumPy products of the rounded
    # operands, within eps of the products of their magnitudes (the bound of a rounded dot
    # product)
    from jaxlab.models import decoder

    rng = np.random.default_rng(0)
    x, w, c = rng.normal(size=(3, 5, 16)), rng.normal(size=(16, 8)), rng.normal(size=(3, 5, 8))
    dims = (((2,), (0,)), ((), ()))

    def loss(x, w):
        out = decoder.row_dot_general(x, w, dims)
        return jnp.sum(out * c.astype(dtype)), out

    (_, out), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(x, dtype), jnp.asarray(w, dtype))
    xr, wr, cr = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w, c))
    assert out.dtype == dx.dtype == dw.dtype == jnp.dtype(dtype)
    def weight_grad(a, b):
        return np.einsum("bte,btf->ef", a, b)

    for got, want, scale in (
            (out, xr @ wr, np.abs(xr) @ np.abs(wr)),
            (dx, cr @ wr.T, np.abs(cr) @ np.abs(wr).T),
            (dw, weight_grad(xr, cr), weight_grad(np.abs(xr), np.abs(cr)))):
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= eps * scale)


def test_the_tied_head_multiplies_the_embedding_as_stored():
    # through the embedding's transpose XLA's CPU backend copies it, twice (transposed, and in
    # float32); contracted as stored it holds nothing beyond the logits
    c = DecoderConfig.from_hf(zoo.hf_config("qwen3", "released"), param_dtype="bfloat16")
    assert c.tie_word_embeddings
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(c, nnx.Rngs(0))))
    hidden = jax.ShapeDtypeStruct((256, c.hidden_size), jnp.bfloat16)  # a decode step's
    head = jax.jit(lambda state, x: nnx.merge(graphdef, state).logits(x))
    memory = head.lower(state, hidden).compile().memory_analysis()
    embedding = c.vocab_size * c.hidden_size * 2
    assert memory.output_size_in_bytes == 256 * c.vocab_size * 4
    assert memory.temp_size_in_bytes < embedding / 8


def test_greedy_continuation_matches_transformers_generate(pair):
    _, _, reference, model = pair
    prompt = _ids(1, 8, seed=3)
    with torch.no_grad():
        theirs = reference.generate(torch.as_tensor(prompt), max_new_tokens=64, do_sample=False,
                                    min_new_tokens=64, pad_token_id=0)[0, 8:].numpy()
    logits, cache = model.prefill(jnp.asarray(prompt), cache_size=72)
    decode = jax.jit(lambda tokens, cache: model.decode(tokens, cache))
    token = jnp.argmax(logits[:, -1], axis=-1)
    ours = []
    for _ in range(64):
        ours.append(int(token[0]))
        step, cache = decode(token, cache)
        token = jnp.argmax(step, axis=-1)
    np.testing.assert_array_equal(ours, theirs)


def test_save_then_load_is_exact_and_transformers_reads_it(pair, tmp_path):
    _, _, reference, model = pair
    hf.save_pretrained(model, tmp_path)
    again = hf.load_pretrained(tmp_path)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(jax.tree.map(
            np.asarray, jax.tree.leaves(model))), jax.tree_util.tree_leaves_with_path(
            jax.tree.map(np.asarray, jax.tree.leaves(again))), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(1, 12, seed=4)
    np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(reference, ids),
                               atol=1e-6)


def test_sharded_load_equals_single_device_load(pair, data_mesh8):
    _, path, _, model = pair
    sharded = hf.load_pretrained(path, mesh=data_mesh8)
    kernel = sharded.layers[0].mlp.up_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jnp.asarray(_ids(2, 8, seed=5))
    np.testing.assert_allclose(sharded(ids), model(ids), atol=1e-5)


def test_bfloat16_stays_near_float32(pair):
    _, path, _, model = pair
    half = hf.load_pretrained(path, param_dtype="bfloat16")
    assert half.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ids = jnp.asarray(_ids(2, 16, seed=6))
    error = np.max(np.abs(np.asarray(half(ids)) - np.asarray(model(ids))))
    assert 0 < error < 0.05  # logits of these models have magnitude ~1


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    return zoo.create("qwen3", tmp_path_factory.mktemp("qwen3zoo"))


def _edit_config(src, dst, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(model_type="nonexistent-arch"), "supported model types"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "yarn"),
])
def test_unsupported_config_is_named(qwen3_folder, tmp_path, changes, match):
    folder = _edit_config(qwen3_folder, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=match):
        hf.load_pretrained(folder)


def test_missing_unexpected_and_misshaped_tensors_are_reported_together(qwen3_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(qwen3_folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    folder = _edit_config(qwen3_folder, tmp_path / "bad")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(hf.CheckpointError) as error:
        hf.load_pretrained(folder)
    message = str(error.value)
    for part in ("missing tensor model.layers.1.mlp.up_proj.weight",
                 "unexpected tensor model.layers.0.extra.weight",
                 "model.norm.weight in model.safetensors has shape [63], expected [64]"):
        assert part in message


def test_integer_tensor_is_refused(qwen3_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(qwen3_folder / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(64, np.int32)
    folder = _edit_config(qwen3_folder, tmp_path / "bad")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(hf.CheckpointError, match="dtype I32"):
        hf.load_pretrained(folder)


def test_missing_files_are_named(qwen3_folder, tmp_path):
    with pytest.raises(hf.CheckpointError, match=r"config\.json does not exist"):
        hf.load_pretrained(tmp_path)
    folder = _edit_config(qwen3_folder, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors does not exist"):
        hf.load_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match=r"missing.*00002"):
        hf.load_pretrained(folder)


def test_sharded_checkpoint_with_index_loads(qwen3_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(qwen3_folder / "model.safetensors")
    names = sorted(tensors)
    folder = _edit_config(qwen3_folder, tmp_path / "two")
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for part, chunk in enumerate((names[::2], names[1::2]), start=1):
        file = f"model-0000{part}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, folder / file)
        weight_map.update(dict.fromkeys(chunk, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = jnp.asarray(_ids(1, 6))
    np.testing.assert_array_equal(hf.load_pretrained(folder)(ids),
                                  hf.load_pretrained(qwen3_folder)(ids))


def test_tokens_outside_the_vocabulary_and_long_prompts_are_refused(qwen3_folder):
    model = hf.load_pretrained(qwen3_folder)
    with pytest.raises(ValueError, match=r"token id 512 at \(0, 2\)"):
        model(jnp.asarray([[1, 2, 512]]))
    with pytest.raises(ValueError, match="longer than the cache"):
        model.prefill(jnp.asarray([[1, 2, 3]]), cache_size=2)
    _, cache = model.prefill(jnp.asarray([[1, 2]]), cache_size=2)
    with pytest.raises(ValueError, match="cache is full"):
        model.decode(jnp.asarray([3]), cache)


def test_zoo_builds_every_family(tmp_path):
    for family in zoo.RELEASED:
        model = hf.load_pretrained(zoo.create(family, tmp_path / family))
        assert isinstance(model, Decoder) and model.config.family == family


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}])
def test_rope_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = zoo.hf_config("llama", head_dim=64, rope_parameters=rope)
    if rope["rope_type"] == "default":
        theirs = 1.0 / rope["rope_theta"] ** (np.arange(0, 64, 2) / 64)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    ours = DecoderConfig.from_hf(config).rope.inv_freq(64)
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-6)


def test_save_replaces_a_sharded_checkpoint_and_keeps_extra_fields(qwen3_folder, tmp_path):
    model = hf.load_pretrained(qwen3_folder)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "old.safetensors"}}))
    hf.save_pretrained(model, tmp_path, eos_token_id=7)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 7
    ids = jnp.asarray(_ids(1, 5))
    np.testing.assert_array_equal(hf.load_pretrained(tmp_path)(ids), model(ids))


def test_int8_cache_stays_near_the_float_cache(qwen3_folder):
    model = hf.load_pretrained(qwen3_folder)
    ids = jnp.asarray(_ids(2, 12, seed=7))
    full = np.asarray(model(ids))
    logits, cache = model.prefill(ids[:, :8], cache_size=16, int8_cache=True)
    assert cache.keys[0].dtype == jnp.int8
    assert cache.key_scale[0].shape == cache.values[0].shape[:-1]  # one scale per slot and head
    errors = [np.max(np.abs(np.asarray(logits) - full[:, :8]))]
    for t in range(8, 12):
        step, cache = model.decode(ids[:, t], cache)
        errors.append(np.max(np.abs(np.asarray(step) - full[:, t])))
    assert 0 < max(errors) < 0.02  # logits of this model are ~1; int8 rounding is ~0.4%
    float_cache = model.init_cache(2, 16)
    assert cache.nbytes < 0.3 * float_cache.nbytes + 2 * 2 * 16 * 2 * 4 * 2
