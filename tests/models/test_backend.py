"""The backend policies: chosen from the devices, and each one's model against PyTorch's.

The GPU and TPU policies run here as they run on their chips (dot_product_attention, float
caches, "slots" keys, plain products, the Pallas decode kernels, in interpret mode on the CPU).
"""

import dataclasses
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlab.models import backend, decoder, hf, zoo  # noqa: E402
from jaxlab.models.backend import POLICIES, backend_policy  # noqa: E402

NAMES = ("cpu", "gpu", "tpu")


def _devices(*platforms):
    return [types.SimpleNamespace(platform=p) for p in platforms]


def test_auto_takes_the_devices_platform_and_a_named_policy_runs_anywhere(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    assert backend_policy() == POLICIES["cpu"]  # the test machine's devices
    assert backend_policy(_devices("tpu", "tpu")) == POLICIES["tpu"]
    assert backend_policy(_devices("cuda")) == backend_policy(_devices("gpu")) == POLICIES["gpu"]
    assert not POLICIES["gpu"].interpret and not POLICIES["tpu"].interpret
    # a policy of another platform runs its kernels in interpret mode; the CPU's has none
    assert backend_policy(name="gpu") == dataclasses.replace(POLICIES["gpu"], interpret=True)
    assert backend_policy(_devices("tpu"), "cpu") == POLICIES["cpu"]
    monkeypatch.setenv(backend.ENV, "tpu")
    assert backend_policy().name == "tpu" and backend_policy().interpret
    assert backend_policy(name="gpu").name == "gpu"  # an argument wins over the environment
    monkeypatch.setenv(backend.ENV, "npu")
    with pytest.raises(ValueError, match=r"'npu' \(argument or \$JAXLAB_POLICY\)"):
        backend_policy()
    with pytest.raises(ValueError, match="several platforms"):
        backend_policy(_devices("cpu", "tpu"), "auto")


def test_the_accelerator_policies_are_the_plain_code_and_the_cpu_policy_its_workarounds():
    for name in ("gpu", "tpu"):
        p = POLICIES[name]
        assert (p.attention, p.key_layout, p.half_as_bits, p.row_products) == (
            "dot_product", "slots", False, False)
        assert p.decode_kernel == p.pallas == f"pallas_{name}"
    cpu = POLICIES["cpu"]
    assert (cpu.attention, cpu.decode_kernel, cpu.key_layout, cpu.half_as_bits,
            cpu.row_products, cpu.pallas) == ("grouped", "portable", "dims", True, True, None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random-init PyTorch Qwen3 with head dim 128 (what the TPU kernel takes), saved."""
    torch.manual_seed(0)
    config = zoo.hf_config("qwen3", head_dim=128)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    return path, model


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("cache", ["unrolled", "stacked", "paged"])
@pytest.mark.parametrize("name", NAMES)
def test_each_policy_prefills_and_decodes_the_pytorch_models_logits(pair, name, cache):
    path, reference = pair
    model = hf.load_pretrained(path, backend=name)
    assert model.backend == backend_policy(name=name)
    ids = np.random.default_rng(1).integers(0, 512, (2, 14))
    want = _torch_logits(reference, ids)
    np.testing.assert_allclose(model(jnp.asarray(ids)), want, atol=1e-4)
    logits, prefix = model.prefill(jnp.asarray(ids[:, :8]), cache_size=8,
                                   scan_layers=cache == "stacked")
    np.testing.assert_allclose(logits[:, -1], want[:, 7], atol=1e-4)
    assert prefix.key_layout == model.backend.key_layout
    # the tokens after the prompt go to a cache of their own, read with the prompt's (cascade)
    if cache == "paged":
        own = model.init_paged_cache(2, 16, kv_pages=5, kv_page_slots=8)  # page 0: scratch
        own = own.replace(pages=jnp.asarray([[3, 1], [2, 4]], jnp.int32))
    else:
        own = model.init_cache(2, 16, scan_layers=cache == "stacked")
    own = own.replace(positions=prefix.positions)
    step = jax.jit(lambda tokens, own: model.decode(tokens, own, prefix))
    for t in range(8, 14):
        out, own = step(jnp.asarray(ids[:, t]), own)
        np.testing.assert_allclose(out, want[:, t], atol=2e-3 if name == "tpu" else 1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_a_bfloat16_cache_is_bits_under_the_cpu_policy_only_and_decodes_alike(pair, name):
    path, _ = pair
    model = hf.load_pretrained(path, param_dtype="bfloat16", backend=name)
    cpu = hf.load_pretrained(path, param_dtype="bfloat16", backend="cpu")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 12)))
    _, cache = model.prefill(ids[:, :6], cache_size=16)
    _, reference = cpu.prefill(ids[:, :6], cache_size=16)
    assert {x.dtype for x in jax.tree.leaves(cache.fields)} == {
        jnp.dtype(jnp.uint16 if name == "cpu" else jnp.bfloat16)}
    for t in range(6, 12):
        out, cache = model.decode(ids[:, t], cache)
        want, reference = cpu.decode(ids[:, t], reference)
        # bfloat16 products in another order (the TPU kernel reads keys in bfloat16 too)
        np.testing.assert_allclose(out, want, atol=0.05)


def _dots(model, ids):
    """(operand ranks, output dtype) of every dot_general in the traced full forward."""
    jaxpr = jax.make_jaxpr(lambda ids: model(ids))(ids)
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append((eqn.invars[0].aval.ndim, eqn.outvars[0].aval.dtype))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


def test_linear_layers_multiply_as_written_off_the_cpu_and_as_rows_on_it(pair):
    path, _ = pair
    ids = jnp.zeros((2, 5), jnp.int32)
    model = hf.load_pretrained(path, param_dtype="bfloat16", backend="gpu")
    plain = _dots(model, ids)
    # 7 projections per layer and the head, on [B, T, E] in bfloat16 (attention's products
    # are dot_product_attention's, batched over heads: 4-d)
    projections = [d for d in plain if d[0] == 3]
    assert len(projections) == 2 * 7 + 1
    assert {d for d in projections[:-1]} == {(3, jnp.dtype(jnp.bfloat16))}
    assert projections[-1] == (3, jnp.dtype(jnp.float32))  # the head's logits
    model.set_backend("cpu")
    assert model.backend == POLICIES["cpu"]
    rows = _dots(model, ids)
    assert not [d for d in rows if d[0] == 3]  # rows [N, E], asked for in float32
    assert [d for d in rows if d[0] == 2] == [(2, jnp.dtype(jnp.float32))] * (2 * 7 + 1)
    assert {n.dot_general for _, n in nnx.iter_graph(model.layers)
            if isinstance(n, nnx.Linear)} == {decoder.row_dot_general}
