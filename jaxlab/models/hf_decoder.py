"""Hugging Face checkpoints <-> `Decoder`: config.json through transformers' config classes,
weights through safetensors, mapped name by name and strictly.

    model = load_pretrained("path/to/Qwen3-0.6B", dtype="bfloat16")
    save_pretrained(model, "path/to/out")      # transformers' from_pretrained loads it back
    tokenizer = load_tokenizer("path/to/Qwen3-0.6B")

Nothing is downloaded: a path is a local folder. Loading never initializes weights at random:
the model is built abstractly (`nnx.eval_shape`) and every parameter comes from the files; missing,
unexpected and mis-shaped tensors are reported together in one error.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from jaxlab.models.decoder import FAMILIES, Decoder, DecoderConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded exactly; the message says what and where."""


def weight_names(config: DecoderConfig) -> dict[str, tuple[tuple, bool]]:
    """Hugging Face tensor name -> (path of our parameter, whether it is stored transposed).

    torch's Linear stores [out, in]; our kernels are [in, out].
    """
    names = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
             "model.norm.weight": (("norm", "weight"), False)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        linears = {"self_attn": [("q_proj", config.qkv_bias), ("k_proj", config.qkv_bias),
                                 ("v_proj", config.qkv_bias), ("o_proj", config.o_bias)],
                   "mlp": [(p, config.mlp_bias) for p in ("gate_proj", "up_proj", "down_proj")]}
        for part, projections in linears.items():
            for proj, bias in projections:
                names[f"{hf}.{part}.{proj}.weight"] = ((*ours, part, proj, "kernel"), True)
                if bias:
                    names[f"{hf}.{part}.{proj}.bias"] = ((*ours, part, proj, "bias"), False)
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["self_attn.q_norm", "self_attn.k_norm"] if config.qk_norm else []
        for norm in norms:
            names[f"{hf}.{norm}.weight"] = ((*ours, *norm.split("."), "weight"), False)
    return names


def load_config(path: str | pathlib.Path, *, dtype: str = "float32",
                activation_dtype: str | None = None) -> DecoderConfig:
    """The DecoderConfig of a local Hugging Face folder's config.json."""
    from transformers import AutoConfig

    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (a local Hugging Face model folder "
                              f"is needed)")
    try:
        hf = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path / 'config.json'}: transformers cannot read it ({e}); "
                              f"supported model types: {FAMILIES}") from None
    try:
        return DecoderConfig.from_hf(hf, param_dtype=dtype, dtype=activation_dtype)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def _tensor_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{index} names weight files that are missing: {absent}")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, framework="numpy") as f:
        return dict.fromkeys(f.keys(), single)


def param_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """A matrix is split over the mesh's first axis along its largest dimension that the axis
    size divides; vectors and matrices with no such dimension are replicated."""
    axis = mesh.axis_names[0]
    dims = [int(i) for i in np.argsort(shape)[::-1] if shape[i] % mesh.shape[axis] == 0]
    if len(shape) < 2 or not dims:
        return NamedSharding(mesh, PartitionSpec())
    parts = [None] * len(shape)
    parts[dims[0]] = axis
    return NamedSharding(mesh, PartitionSpec(*parts))


def load_pretrained(path: str | pathlib.Path, *, dtype: str = "float32",
                    activation_dtype: str | None = None, mesh: Mesh | None = None) -> Decoder:
    """A `Decoder` with every weight read from the local Hugging Face folder `path`.

    Args:
      dtype: the parameters' dtype (tensors are cast to it); activations default to it too.
      mesh: place parameters sharded over this mesh (`param_sharding`); each device reads only
        its own slice from the files.
    Raises:
      CheckpointError: unsupported architecture or config values, missing files, or tensors that
        are missing, unexpected, mis-shaped or not floating point (all listed at once).
    """
    path = pathlib.Path(path)
    config = load_config(path, dtype=dtype, activation_dtype=activation_dtype)
    abstract = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    targets = {ours: (name, transposed) for name, (ours, transposed) in
               weight_names(config).items()}
    files = _tensor_files(path)
    flat = dict(nnx.to_flat_state(state))
    expected = {name for name, _ in targets.values()}
    problems = [f"missing tensor {name}" for name in sorted(expected - files.keys())]
    tied_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    problems += [f"unexpected tensor {name}"
                 for name in sorted(files.keys() - expected - tied_extra)]
    loaded = {}
    for ours, variable in flat.items():
        name, transposed = targets[ours]
        if name not in files:
            continue
        with safe_open(files[name], framework="numpy") as f:
            view = f.get_slice(name)
            shape = tuple(view.get_shape())
            file_dtype = view.get_dtype()
        want = variable.shape
        got = shape[::-1] if transposed else shape
        if got != want:
            problems.append(f"tensor {name} in {files[name].name} has shape {list(shape)}, "
                            f"expected {list(want[::-1] if transposed else want)}")
            continue
        if file_dtype not in ("F32", "BF16", "F16", "F64"):
            problems.append(f"tensor {name} in {files[name].name} has dtype {file_dtype}, "
                            f"expected a floating-point type")
            continue
        sharding = None if mesh is None else param_sharding(want, mesh)
        loaded[ours] = _read(files[name], name, transposed, want, _DTYPES[dtype], sharding)
    if problems:
        raise CheckpointError(f"{path} does not match the {config.family} architecture of its "
                              f"config.json:\n  " + "\n  ".join(problems))
    for ours, variable in flat.items():
        variable.set_value(loaded[ours])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _read(file: pathlib.Path, name: str, transposed: bool, shape, dtype, sharding):
    """One tensor as a jax.Array of `dtype`; with a sharding, each device reads only its slice."""

    def host(index=None) -> np.ndarray:
        with safe_open(file, framework="numpy") as f:  # bfloat16 through ml_dtypes
            if index is None:
                array = f.get_tensor(name)
            else:  # our index is on the transposed tensor when the file stores [out, in]
                array = f.get_slice(name)[index[::-1] if transposed else index]
        return (array.T if transposed else array).astype(dtype, copy=False)

    if sharding is None:
        return jax.device_put(host())
    return jax.make_array_from_callback(shape, sharding, host)


def _hf_config_dict(config: DecoderConfig) -> dict:
    """config.json for `config`, in the transformers format of its family."""
    architectures = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "llama": "LlamaForCausalLM"}
    rope = {"rope_type": config.rope.type, "rope_theta": config.rope.theta}
    if config.rope.type != "default":
        rope["factor"] = config.rope.factor
    if config.rope.type == "llama3":
        rope.update(low_freq_factor=config.rope.low_freq_factor,
                    high_freq_factor=config.rope.high_freq_factor,
                    original_max_position_embeddings=config.rope.original_max_position_embeddings)
    out = {
        "model_type": config.family, "architectures": [architectures[config.family]],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": rope, "rope_theta": config.rope.theta,
        "tie_word_embeddings": config.tie_word_embeddings, "dtype": config.param_dtype,
    }
    if config.family != "qwen2":
        out["attention_bias"] = config.o_bias
    if config.family == "llama":
        out["mlp_bias"] = config.mlp_bias
    return out


def _state_tensors(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for name, (ours, transposed) in weight_names(model.config).items():
        array = np.asarray(jax.device_get(flat[ours][...]))
        yield name, np.ascontiguousarray(array.T if transposed else array)


def save_pretrained(model: Decoder, path: str | pathlib.Path, **config_fields) -> None:
    """Writes config.json and model.safetensors that transformers' `from_pretrained` loads.

    `config_fields` go into config.json as well (e.g. eos_token_id=..., bos_token_id=...).
    A sharded checkpoint's index left in the folder is removed, so the folder loads what was
    written.
    """
    from safetensors.flax import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    config = {**_hf_config_dict(model.config), **config_fields}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({name: jnp.asarray(array) for name, array in _state_tensors(model)},
              str(path / "model.safetensors"), metadata={"format": "pt"})


def load_tokenizer(path: str | pathlib.Path):
    """The tokenizer saved in the same local folder, through transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pathlib.Path(path), local_files_only=True)
