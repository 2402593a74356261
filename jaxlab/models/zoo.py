"""Small random-init checkpoints of real architectures, for tests and demos (nothing downloaded).

Each family starts from the config of a released model and keeps its architectural choices
(RoPE theta and scaling, q/k norms, biases, tied embeddings, grouped-query attention); sizes are
overridden: "tiny" for tests; "released" keeps the released shape (Qwen3-0.6B, Qwen2.5-0.5B,
Llama-3.2-1B) for benchmarks.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from flax import nnx
from jax.typing import DTypeLike

from jaxlab.config import dtype_name, require
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.models.hf import load_decoder_config, save_pretrained

# The released configs' architecture fields (Qwen3-0.6B, Qwen2.5-0.5B, Llama-3.2-1B).
RELEASED = {
    "qwen3": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  tie_word_embeddings=True, attention_bias=False),
    "qwen2": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  rms_norm_eps=1e-6, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  tie_word_embeddings=True),
    "llama": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=131072,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                  tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
}
# The released Qwen3 dense models: each one's config.json fields (Hugging Face Qwen/Qwen3-<size>)
# that differ from Qwen3-0.6B's (RELEASED["qwen3"]). All have 8 kv heads of 128 dims, a
# vocabulary of 151,936 and 40,960 positions; 0.6B, 1.7B and 4B tie the output head to the
# embedding.
QWEN3_SIZES = {
    "0.6B": {},
    "1.7B": dict(hidden_size=2048, intermediate_size=6144),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                num_attention_heads=64, tie_word_embeddings=False),
}
SIZES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "released": {},
}


def hf_config(family: str, size: str = "tiny", **overrides):
    """A transformers config of `family` at `size`, with any field overridden."""
    from transformers import AutoConfig

    if family not in RELEASED or size not in SIZES:
        raise ValueError(f"unknown family {family!r} or size {size!r}; families: "
                         f"{sorted(RELEASED)}, sizes: {sorted(SIZES)}")
    fields = {**RELEASED[family], **SIZES[size], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def qwen3(size: str, *, param_dtype: str = "float32", compute_dtype: str | None = None,
          **overrides) -> DecoderConfig:
    """The architecture of the released Qwen3 model `size` (a key of `QWEN3_SIZES`, e.g. "8B";
    "qwen3-8b" also works), weights in `param_dtype`, compute in `compute_dtype` (default: the
    weights'), any field overridden (e.g. num_hidden_layers)."""
    _refuse_dtype(overrides, "qwen3")
    name = size.removeprefix("qwen3-").removeprefix("Qwen3-").upper()
    name = {key.upper(): key for key in QWEN3_SIZES}.get(name)
    if name is None:
        raise ValueError(f"unknown Qwen3 size {size!r}; sizes: {list(QWEN3_SIZES)}")
    return DecoderConfig.from_hf(hf_config("qwen3", "released", **QWEN3_SIZES[name], **overrides),
                                 param_dtype=param_dtype, compute_dtype=compute_dtype)


def create(family: str, path: str | pathlib.Path, *, size: str = "tiny", seed: int = 0,
           param_dtype: DTypeLike = "float32", tokenizer: bool = False,
           **overrides) -> pathlib.Path:
    """Writes a random-init checkpoint folder (config.json + model.safetensors) and returns it;
    with `tokenizer`, `chat_tokenizer()` beside them (a chat model's folder, for tests and
    demos of the chat-template paths).

    param_dtype: the stored parameters' dtype, float32, bfloat16 or float16, as a name or a
    NumPy or JAX dtype; another value is a ValueError naming `param_dtype`, raised before
    anything is written.
    """
    _refuse_dtype(overrides, "create")
    param_dtype = dtype_name(param_dtype, "param_dtype")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config(family, size, **overrides).save_pretrained(path)
    model = Decoder(load_decoder_config(path, param_dtype=param_dtype), nnx.Rngs(seed))
    save_pretrained(model, path)
    if tokenizer:
        chat_tokenizer().save_pretrained(path)
    return path


# Qwen's ChatML chat template, reduced to what a test needs: each message as
# <|im_start|>role\ncontent<|im_end|>\n, then the assistant turn opened on request.
CHATML = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content"
    " + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHATML_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def char_tokenizer(vocab: Sequence[str], *, unk: str, pad: str, eos: str,
                   special: Sequence[str] = ()):
    """A transformers fast tokenizer of one token per character: `vocab[i]` has id i, `special`
    tokens (members of `vocab`) are matched whole before the text is split into characters."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if special:
        core.add_special_tokens([AddedToken(t, special=True) for t in special])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, eos_token=eos)


def chat_tokenizer():
    """A transformers fast tokenizer for tests and demos: one token per printable ASCII
    character after Qwen's three special tokens (ids 0-2; 103 tokens in all, within the tiny
    size's vocabulary), EOS `<|im_end|>`, padding `<|endoftext|>`, and `CHATML` as its chat
    template."""
    import string

    tokenizer = char_tokenizer([*CHATML_SPECIAL, *sorted(set(string.printable))],
                               unk=CHATML_SPECIAL[0], pad=CHATML_SPECIAL[0], eos="<|im_end|>",
                               special=CHATML_SPECIAL)
    tokenizer.chat_template = CHATML
    return tokenizer


def _refuse_dtype(overrides: dict, where: str) -> None:
    """A `dtype` among the architecture overrides would be a transformers config field that
    builds nothing: refused, naming the arguments that choose the dtypes."""
    given = sorted({"dtype", "torch_dtype"} & overrides.keys())
    require(not given, f"zoo.{where}: {given} is not an architecture setting; the weights' dtype "
                       f"is param_dtype= and the activations' compute_dtype=")
