"""Dtypes as users write them: a name, a NumPy dtype or a JAX dtype object build the same model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.config import dtype_name
from jaxlab.models import hf, zoo
from jaxlab.models.decoder import DecoderConfig

SPELLINGS = {
    "float32": [np.float32, jnp.float32, np.dtype("float32"), jnp.dtype("float32")],
    "bfloat16": [jnp.bfloat16, jnp.dtype("bfloat16"), np.dtype(jnp.bfloat16)],
    "float16": [np.float16, jnp.dtype("float16")],
}
CASES = [(name, spelling) for name, spellings in SPELLINGS.items() for spelling in spellings]


def _params(model) -> dict:
    return {path: param[...] for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def by_name(tmp_path_factory):
    """Per dtype name: the model that zoo.create + load_pretrained give for the string."""
    models = {}
    for name in SPELLINGS:
        path = zoo.create("qwen3", tmp_path_factory.mktemp(name), seed=3, param_dtype=name)
        models[name] = hf.load_pretrained(path, param_dtype=name)
    return models


@pytest.mark.parametrize("name, spelling", CASES, ids=[f"{n}-{s!r}" for n, s in CASES])
def test_dtype_objects_load_the_same_model_as_names(by_name, tmp_path, name, spelling):
    assert dtype_name(spelling, "dtype") == name
    path = zoo.create("qwen3", tmp_path, seed=3, param_dtype=spelling)
    model, expected = hf.load_pretrained(path, param_dtype=spelling), by_name[name]
    assert model.config == expected.config and hash(model.config) == hash(expected.config)
    assert model.config.param_dtype == model.config.compute_dtype == name
    ours, theirs = _params(model), _params(expected)
    assert ours.keys() == theirs.keys()
    for path_, value in ours.items():
        assert value.dtype == theirs[path_].dtype == jnp.dtype(name), path_
        np.testing.assert_array_equal(np.asarray(value, np.float32),
                                      np.asarray(theirs[path_], np.float32), err_msg=str(path_))


def test_compute_dtype_and_config_fields_take_objects(by_name, tmp_path):
    path = zoo.create("qwen3", tmp_path, seed=3)
    model = hf.load_pretrained(path, param_dtype=np.float32, compute_dtype=jnp.bfloat16)
    assert (model.config.param_dtype, model.config.compute_dtype) == ("float32", "bfloat16")
    config = DecoderConfig.from_hf(zoo.hf_config("qwen3"), param_dtype=jnp.bfloat16,
                                   compute_dtype=np.dtype("float16"))
    assert (config.param_dtype, config.compute_dtype) == ("bfloat16", "float16")
    assert config == DecoderConfig.from_hf(zoo.hf_config("qwen3"), param_dtype="bfloat16",
                                           compute_dtype="float16")
    assert isinstance(hash(config), int)  # hashable: usable as a static argument


@pytest.mark.parametrize("value, shown", [
    (jnp.int8, "int8"), (np.dtype("float64"), "float64"), ("bf16", "'bf16'"), ("fp32", "'fp32'"),
    (None, "None"), (2.5, "2.5"),
])
def test_bad_dtypes_name_the_argument_and_the_value(value, shown):
    with pytest.raises(ValueError) as info:
        dtype_name(value, "param_dtype")
    assert str(info.value) == f"param_dtype must be float32, bfloat16 or float16, got {shown}"


def test_load_pretrained_blames_the_argument_not_the_checkpoint(tmp_path):
    path = zoo.create("qwen3", tmp_path / "model", seed=3)
    for kwargs, error in [
        (dict(param_dtype="bf16"), "param_dtype must be float32, bfloat16 or float16, got 'bf16'"),
        (dict(param_dtype=jnp.int8), "param_dtype must be float32, bfloat16 or float16, got int8"),
        (dict(compute_dtype=np.float64),
         "compute_dtype must be float32, bfloat16 or float16, got float64"),
    ]:
        with pytest.raises(ValueError) as info:
            hf.load_pretrained(path, **kwargs)
        assert str(info.value) == error
        assert not isinstance(info.value, hf.CheckpointError)
    with pytest.raises(ValueError, match=r"^param_dtype must be .*, got int8$"):
        DecoderConfig.from_hf(zoo.hf_config("qwen3"), param_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"^param_dtype must be .*, got 'half'$"):
        zoo.create("qwen3", tmp_path / "never", param_dtype="half")
    assert not (tmp_path / "never").exists()  # refused before anything is written


def test_a_dtype_among_architecture_overrides_is_refused_naming_the_arguments(tmp_path):
    """`dtype=` would be a transformers config field that builds nothing (the weights would be
    float32 whatever it says): refused, pointing at param_dtype and compute_dtype."""
    for build in (lambda: zoo.qwen3("0.6B", dtype="bfloat16"),
                  lambda: zoo.create("qwen3", tmp_path / "never", torch_dtype="bfloat16")):
        with pytest.raises(ValueError, match=r"is not an architecture setting.*param_dtype="
                                             r".*compute_dtype="):
            build()
    assert not (tmp_path / "never").exists()
    assert zoo.qwen3("0.6B", compute_dtype="bfloat16").compute_dtype == "bfloat16"
