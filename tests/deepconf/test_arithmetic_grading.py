"""Grading of the arithmetic task (`arithmetic.grade`) on hand-made responses, and
`arithmetic.greedy_accuracy` on a decoder whose greedy output is known by construction."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.deepconf import arithmetic
from jaxlab.models.decoder import Decoder, DecoderConfig


@pytest.mark.parametrize("response, answer, expected", [
    # (correct, formatted): the content of the last balanced \boxed{...}, stripped, must equal
    # the answer string exactly; formatted is whether there is a (non-blank) boxed answer at all.
    (r" 37+48=85, 85+19=104. \boxed{104}", "104", (True, True)),     # exact boxed answer
    (r" 37+48=85, 85+19=105. \boxed{105}", "104", (False, True)),    # wrong boxed answer
    (r" \boxed{104}, no: \boxed{105}", "104", (False, True)),        # the last box counts...
    (r" \boxed{105}, no: \boxed{104}", "104", (True, True)),         # ... whichever it holds
    (r" \boxed{ 104 }", "104", (True, True)),                        # whitespace in the box
    ("\\boxed{\n104\n}", "104", (True, True)),
    (" 37+48=85, 85+19=104.", "104", (False, False)),                # no box at all
    ("", "104", (False, False)),
    (r" 104. \boxed{}", "104", (False, False)),                      # an empty box: no answer
    (r" 104. \boxed{  }", "104", (False, False)),                    # a blank box: no answer
    (r" \boxed{104", "104", (False, False)),                         # a box never closed
    (r" \boxed{104}", "10", (False, True)),                          # answer a prefix of the box
    (r" \boxed{104}", "04", (False, True)),                          # ... a suffix of it
    (r" \boxed{10}", "104", (False, True)),                          # box a prefix of the answer
    (r" \boxed{1104}", "104", (False, True)),                        # answer a suffix of the box
    (r" \boxed{104.}", "104", (False, True)),                        # exact strings, not numbers
    (r" \boxed{0104}", "104", (False, True)),
])
def test_grade(response, answer, expected):
    assert arithmetic.grade(response, answer) == expected


# --------------------------------------------------------------------------------------------
# greedy_accuracy

V = arithmetic.VOCAB
EOS = V.index(arithmetic.EOS)
# The decoder below is a bigram table: its next token depends on the last token only.
# A prompt ending in ":" (every task prompt ends in "A:") continues with " \boxed{104}" and
# EOS; a prompt ending in "\n" continues with "7" forever (no box). Every character of the box
# chain is distinct, so a bigram table can write it.
BOX_CHAIN = ":" + r" \boxed{104}"
SUCCESSOR = {V.index(a): V.index(b) for a, b in itertools.pairwise(BOX_CHAIN)}
SUCCESSOR[V.index("}")] = EOS
SUCCESSOR[V.index("\n")] = V.index("7")
SUCCESSOR[V.index("7")] = V.index("7")


@pytest.fixture(scope="module")
def bigram_decoder() -> Decoder:
    """A real Qwen3-architecture `Decoder` with hand-set weights: every layer's attention output
    projection and MLP down projection are zero, so the residual stream at a token is its
    embedding; the embedding of token i is the basis vector e_i and the untied output head maps
    e_i to e_SUCCESSOR[i], so the logits at token i are sqrt(E) at SUCCESSOR[i] (the final
    RMSNorm of e_i is sqrt(E) e_i) and 0 elsewhere. Its greedy continuation of any prompt is
    therefore known by hand, while the sampler runs its whole path (prefill, KV cache, decode
    loop, stop tokens, lengths) on it. (A random-init model practically never writes a box, so
    against one only an accuracy of 0 could be checked; a trained one takes minutes.)"""
    config = DecoderConfig(family="qwen3", vocab_size=len(V), hidden_size=32,
                           intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                           head_dim=8, qk_norm=True, tie_word_embeddings=False,
                           max_position_embeddings=256)
    model = Decoder(config, nnx.Rngs(0))
    for layer in model.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    model.embed_tokens.embedding[...] = jnp.eye(len(V), config.hidden_size)
    head = np.zeros((config.hidden_size, len(V)), np.float32)
    for token, successor in SUCCESSOR.items():
        head[token, successor] = 1.0
    model.lm_head.kernel[...] = jnp.asarray(head)
    return model


def reference_greedy(model: Decoder, prompt: str, max_new_tokens: int) -> str:
    """Plain greedy decoding, independent of the sampler: the full forward pass (no cache) over
    the whole sequence for every new token, argmax at its last position, stop after EOS. The
    sequence is right-padded to one width (one compiled forward; causal attention: the padding
    after a position never changes its logits)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    width = 32
    ids = arithmetic.encode(prompt)
    new: list[int] = []
    while len(new) < max_new_tokens and (not new or new[-1] != EOS):
        sequence = ids + new
        padded, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        padded[0, :len(sequence)], mask[0, :len(sequence)] = sequence, 1
        logits = forward(state, jnp.asarray(padded), jnp.asarray(mask))
        new.append(int(jnp.argmax(logits[0, len(sequence) - 1])))
    return arithmetic.decode(new)


def test_the_bigram_decoder_writes_what_it_was_built_to(bigram_decoder):
    """The construction itself, checked through the model's full forward pass."""
    assert reference_greedy(bigram_decoder, "Q: 37+67\nA:", 20) == r" \boxed{104}"
    assert reference_greedy(bigram_decoder, "Q: 37+67\n", 5) == "77777"


def test_greedy_accuracy_on_known_outputs(bigram_decoder):
    """greedy_accuracy = the fraction of problems whose greedy response boxes the answer.

    The decoder writes " \\boxed{104}" for every prompt ending in ":" and no box for a prompt
    ending in "\\n", so by hand:
      sum2-0  "Q: 37+67\\nA:" answer "104"   -> boxes 104: correct
      sum2-1  "Q: 50+54\\nA:" answer "104"   -> correct
      sum2-2  "Q: 12+13\\nA:" answer "25"    -> boxes 104: wrong
      sum2-3  "Q: 60+44\\n"   answer "104"   -> no box: wrong
      sum2-4  "Q: 52+52\\nA:" answer "10"    -> boxes 104, a prefix is not the answer: wrong
    2 of 5 = 0.4 with room for the whole box (12 tokens: " \\boxed{104}"), and 0 when
    max_new_tokens = 11 cuts the closing brace off (no complete box is no answer). A grader or
    decoder that looked at the prompt, mixed up rows, ignored the lengths or matched prefixes
    would give another value.
    """
    problems = [arithmetic.Problem(id=f"sum2-{i}", prompt=prompt, answer=answer, solution="")
                for i, (prompt, answer) in enumerate([
                    ("Q: 37+67\nA:", "104"), ("Q: 50+54\nA:", "104"), ("Q: 12+13\nA:", "25"),
                    ("Q: 60+44\n", "104"), ("Q: 52+52\nA:", "10")])]
    assert arithmetic.greedy_accuracy(bigram_decoder, problems, max_new_tokens=12) == 0.4
    assert arithmetic.greedy_accuracy(bigram_decoder, problems, max_new_tokens=11) == 0.0
