"""Errors name their source: file and line for data files, file and tensor for checkpoints, the
argument for API calls. Partial writes are recovered from, and results files get ordinary
permissions."""

import json
import logging
import os
import shutil
import stat

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlab import jsonl, results
from jaxlab.deepconf.problems import load_problems
from jaxlab.jsonl import DataError
from jaxlab.limit import data
from jaxlab.models import hf
from jaxlab.models.hf import CheckpointError


def test_non_utf8_jsonl_names_file_and_line(tmp_path, decoder_folder):          # case 8
    path = tmp_path / "problems.jsonl"
    lines = (decoder_folder / "problems.jsonl").read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1].replace(b"Q:", b"Q\xff:") + lines[2])
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text \(byte 0xff"):
        load_problems(path)
    path.write_bytes(b"".join(lines))                     # corrected: loads
    assert len(load_problems(path)) == 3


def test_non_utf8_dataset_names_file_and_line(tmp_path):
    dataset = data.generate(data.GeneratorConfig(num_docs=6, num_queries=4, k=2,
                                                 attributes_per_doc=4))
    folder = data.save(dataset, tmp_path / "d")
    corpus = folder / "corpus.jsonl"
    corpus.write_bytes(b"\xe9" + corpus.read_bytes())   # Latin-1, not UTF-8
    with pytest.raises(DataError, match=rf"{corpus}:1: not UTF-8"):
        data.load(folder)


@pytest.fixture
def model_copy(tmp_path, decoder_folder):
    return shutil.copytree(decoder_folder, tmp_path / "model")


@pytest.mark.parametrize("keep", [20, 4000])
def test_truncated_safetensors_names_the_file(model_copy, keep):                # case 9
    weights = model_copy / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:keep])                    # header cut / data cut
    with pytest.raises(CheckpointError, match=rf"{weights}: not a readable safetensors file"):
        hf.load_pretrained(model_copy)
    with pytest.raises(CheckpointError, match=rf"{weights}"):
        hf.read_tensors(model_copy)
    weights.write_bytes(whole)
    hf.load_pretrained(model_copy)


def test_index_without_weight_map_names_the_index(model_copy):                  # case 10
    index = model_copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(CheckpointError, match=rf"{index} has no \"weight_map\""):
        hf.load_pretrained(model_copy)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{index}:1: not valid JSON"):
        hf.load_pretrained(model_copy)
    index.unlink()
    hf.load_pretrained(model_copy)


def test_nonfinite_weights_are_refused_or_warned(model_copy, caplog):          # case 20
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][0, :2] = [np.nan, np.inf]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} in {weights} \(1 NaN, 1 inf\)"):
        hf.load_pretrained(model_copy)
    with pytest.raises(CheckpointError, match=name):
        hf.read_tensors(model_copy)
    with caplog.at_level(logging.WARNING, "jaxlab"):
        model = hf.load_pretrained(model_copy, allow_nonfinite=True)
    assert name in caplog.text
    kernel = model.layers[0].mlp.up_proj.kernel[...]          # [in, out]: the file's transpose
    assert np.isnan(kernel[0, 0]) and np.isinf(kernel[1, 0])


def test_dtype_errors_name_the_argument(decoder_folder):                        # case 13
    model = hf.load_pretrained(decoder_folder, param_dtype=jnp.bfloat16)
    assert model.config.param_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"^param_dtype must be .*got int8"):
        hf.load_pretrained(decoder_folder, param_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"^compute_dtype must be .*got 'bf16'"):
        hf.load_pretrained(decoder_folder, compute_dtype="bf16")


def test_partial_last_line_is_dropped_with_a_warning(tmp_path, caplog):         # case 23
    path = tmp_path / "records.jsonl"
    jsonl.append_record(path, {"id": "a", "x": 1})
    jsonl.append_record(path, {"id": "b", "x": "é"})
    whole = path.read_bytes()
    with path.open("ab") as f:                            # a kill in the middle of a write
        f.write(b'{"id": "c", "x": [1, 2')
    with caplog.at_level(logging.WARNING, "jaxlab"):
        records = jsonl.resume_records(path)
    assert records == [{"id": "a", "x": 1}, {"id": "b", "x": "é"}]
    assert f"{path}:3: dropping a partial last line" in caplog.text
    assert path.read_bytes() == whole                     # what was complete is kept
    jsonl.append_record(path, {"id": "c", "x": 3})        # and the run goes on
    assert [r["id"] for r in jsonl.resume_records(path)] == ["a", "b", "c"]
    assert jsonl.resume_records(tmp_path / "absent.jsonl") == []


def test_damaged_complete_line_names_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        jsonl.resume_records(path)


def test_results_files_get_ordinary_permissions(tmp_path):                      # case 27
    old = os.umask(0o022)
    try:
        results.write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o027)
        results.write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_restore_names_and_skips_damaged_steps(tmp_path, caplog):   # cases 12, 25
    from jaxlab.checkpoint import CheckpointConfig, Checkpointer, RestoreError

    def state(step):
        return {"w": jnp.full((64,), float(step)), "step": jnp.int32(step)}

    config = CheckpointConfig(keep_checkpoints=5, best_metric=None, async_save=False)
    with Checkpointer(tmp_path, config) as checkpointer:
        for step in (1, 2, 3, 4):
            checkpointer.save(step, state(step))
    (tmp_path / "4" / "default" / "_METADATA").write_text("{damaged")         # metadata
    shutil.rmtree(tmp_path / "3")
    (tmp_path / "3").mkdir()                                                # emptied
    with Checkpointer(tmp_path, config) as checkpointer:
        with caplog.at_level(logging.WARNING, "jaxlab"):
            restored = checkpointer.restore(state(0))
        assert int(restored["step"]) == 2
        np.testing.assert_array_equal(restored["w"], state(2)["w"])
        for step in (4, 3):
            assert f"checkpoint {tmp_path / str(step)} cannot be restored" in caplog.text
        assert "JSONDecodeError" in caplog.text
        # the damaged steps are set aside, so the run saves them again
        assert checkpointer.all_steps() == [1, 2]
        assert (tmp_path / "4.damaged").is_dir()
        checkpointer.save(3, state(3))
        checkpointer.wait()
        assert int(checkpointer.restore(state(0))["step"]) == 3
    for step in (1, 2, 3):                                # every data file cut short
        for f in (tmp_path / str(step)).rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:10])
    with Checkpointer(tmp_path, config) as checkpointer, pytest.raises(
            RestoreError, match=rf"no checkpoint in {tmp_path} can be restored:\n  {tmp_path}/3"):
        checkpointer.restore(state(0))


def test_checkpoint_with_nonfinite_values_is_skipped(tmp_path, caplog):
    from jaxlab.checkpoint import CheckpointConfig, Checkpointer

    config = CheckpointConfig(best_metric=None, async_save=False)
    with Checkpointer(tmp_path, config) as checkpointer:
        checkpointer.save(1, {"w": jnp.ones(3)})
        checkpointer.save(2, {"w": jnp.array([1.0, jnp.nan, 1.0])})
        with caplog.at_level(logging.WARNING, "jaxlab"):
            restored = checkpointer.restore({"w": jnp.zeros(3)})
    np.testing.assert_array_equal(restored["w"], jnp.ones(3))
    assert f"checkpoint {tmp_path / '2'} cannot be restored (ValueError: non-finite values in" \
        in caplog.text


def _first_key_line(text: str) -> int:
    """The line of the first `":` of a JSON text (where removing the colon breaks it)."""
    return text[:text.index('":')].count("\n") + 1


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_damaged_tokenizer_file_names_file_and_line(model_copy, name):
    file = model_copy / name
    whole = file.read_text()
    file.write_text(whole.replace('":', '"', 1))
    with pytest.raises(CheckpointError,
                       match=rf"{file}:{_first_key_line(whole)}: not valid JSON \(Expecting ':'"):
        hf.load_tokenizer(model_copy)
    file.write_text(whole)                                # corrected: loads
    assert hf.load_tokenizer(model_copy).encode("1+2")


def test_tokenizer_json_that_is_not_a_tokenizer_names_the_file(model_copy):
    file = model_copy / "tokenizer.json"
    whole = file.read_text()
    file.write_text('{"added_tokens": [],\n "model": {"type": "Nope"}}')
    with pytest.raises(CheckpointError, match=rf"{file}:2: not a tokenizer"):
        hf.load_tokenizer(model_copy)
    file.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=rf"{file}: expected a JSON object, got list"):
        hf.load_tokenizer(model_copy)
    file.unlink()                                         # no tokenizer at all: the folder
    with pytest.raises(CheckpointError, match=rf"{model_copy}: transformers cannot load"):
        hf.load_tokenizer(model_copy)
    file.write_text(whole)
    assert hf.load_tokenizer(model_copy).encode("1+2")


def test_damaged_config_json_names_file_and_line(model_copy):
    file = model_copy / "config.json"
    whole = file.read_text()
    file.write_text(whole.replace('":', '"', 1))
    where = rf"{file}:{_first_key_line(whole)}: not valid JSON"
    for load in (hf.hf_config, hf.load_pretrained, hf.load_tokenizer):
        with pytest.raises(CheckpointError, match=where):
            load(model_copy)
    file.write_bytes(b"{\n\xff" + whole.encode()[1:])
    with pytest.raises(CheckpointError, match=rf"{file}:2: not UTF-8 text \(byte 0xff"):
        hf.hf_config(model_copy)
    file.write_text(whole)
    assert hf.hf_config(model_copy).model_type == "qwen3"


def test_read_json_names_file_and_line(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{\n  "a": 1,\n  "b": [1, 2\n}\n')
    with pytest.raises(DataError, match=rf"{path}:4: not valid JSON \(Expecting ',' delimiter"):
        jsonl.read_json(path)
    with pytest.raises(DataError, match=rf"{tmp_path / 'absent.json'} does not exist"):
        jsonl.read_json(tmp_path / "absent.json")
    path.write_text('{\n  "a": 1,\n  "b": [1, 2]\n}\n')
    assert jsonl.read_json(path) == {"a": 1, "b": [1, 2]}


PAIRS = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(40)]


def test_damaged_parquet_names_the_file_and_a_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxlab.rl.reward_model import read_pairs

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), path)
    whole = path.read_bytes()
    for keep in (0, 10, len(whole) // 2, len(whole) - 4):
        path.write_bytes(whole[:keep])
        with pytest.raises(DataError, match=rf"{path}: not readable as a parquet file"):
            read_pairs(path)
    pq.write_table(pa.Table.from_pylist([*PAIRS[:2], {**PAIRS[2], "chosen": None}]), path)
    with pytest.raises(DataError, match=rf"{path}: row 3: field 'chosen' is missing"):
        read_pairs(path)
    path.write_bytes(whole)                               # corrected: loads
    assert len(read_pairs(path)) == len(PAIRS)


def test_damaged_datasets_folder_names_the_folder_and_file(tmp_path):
    import datasets

    from jaxlab.rl.reward_model import read_pairs

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(saved))
    folder = shutil.copytree(saved, tmp_path / "pairs")
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])           # an arrow file cut short
    with pytest.raises(DataError, match=rf"{folder}: not readable as a datasets folder .*"
                                        rf"the folder holds \['{arrow.name}'"):
        read_pairs(folder)
    shutil.rmtree(folder)
    shutil.copytree(saved, folder)
    (folder / "state.json").unlink()                      # incomplete
    with pytest.raises(DataError, match=rf"{folder}: not readable as a datasets folder"):
        read_pairs(folder)
    (folder / "state.json").write_text('{\n  "_data_files": [\n')
    with pytest.raises(DataError, match=rf"{folder / 'state.json'}:3: not valid JSON"):
        read_pairs(folder)
    shutil.rmtree(folder)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(folder))
    with pytest.raises(DataError, match=rf"{folder} holds the splits \['train'\] of a Data"):
        read_pairs(folder)
    assert len(read_pairs(folder / "train")) == len(PAIRS)
    assert len(read_pairs(saved)) == len(PAIRS)


def test_yaml_errors_name_file_and_line(tmp_path):
    from jaxlab.config import ConfigError, read_yaml

    path = tmp_path / "config.yaml"
    good = "seed: 1\nmodel: m\nsampling:\n  temperature: 0.6\n"
    path.write_text(good.replace("temperature: 0.6", "temperature: [0.6"))
    with pytest.raises(ConfigError, match=rf"{path}:5: not valid YAML"):
        read_yaml(path)
    path.write_text(good.replace("model: m", "model: m\n  bad: 1"))
    with pytest.raises(ConfigError, match=rf"{path}:3: not valid YAML"):
        read_yaml(path)
    path.write_bytes(good.replace("m\n", "\xe9\n").encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column 8"):
        read_yaml(path)
    path.write_text(good.replace("m\n", "${oops\n"))
    with pytest.raises(ConfigError, match=rf"{path}: key model: "):
        read_yaml(path)
    path.write_text(good)
    assert read_yaml(path).sampling.temperature == 0.6


@pytest.mark.parametrize("text,where,message", [
    ("", "", "holds no problems"),
    ('{"id": "a", "prompt": "p", "answer": "1"}\n\n', ":2", "not valid JSON"),
    ('{"id": "a", "prompt": "p", "answer": "1"}\n{"id": "b", "answer": "1"}\n', ":2",
     "missing key 'prompt'"),
    ('{"id": "a", "prompt": ["p"], "answer": "1"}\n', ":1", "'prompt' must be str, got list"),
    ('{"id": "a", "prompt": "p", "answer": "1"}\n{"id": "a"\n', ":2", "not valid JSON"),
    ('[1]\n', ":1", "expected a JSON object"),
])
def test_problem_file_errors_name_file_and_line(tmp_path, text, where, message):
    path = tmp_path / "problems.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{path}{where}: {message}|^{path} {message}"):
        load_problems(path)


@pytest.mark.parametrize("name,line,where,message", [
    ("corpus.jsonl", None, "", "no records"),
    ("corpus.jsonl", '{"_id": "x"}', ":7", "missing key 'text'"),
    ("queries.jsonl", '{"_id": "x", "text": 3}', ":5", "'text' must be str, got int"),
    ("qrels.jsonl", '{"query-id": "0", "corpus-id": "0", "score": "1"}', ":9",
     "'score' must be int"),
    ("qrels.jsonl", '{"query-id": "0", ', ":9", "not valid JSON"),
])
def test_dataset_file_errors_name_file_and_line(tmp_path, name, line, where, message):
    dataset = data.generate(data.GeneratorConfig(num_docs=6, num_queries=4, k=2,
                                                 attributes_per_doc=4))
    folder = data.save(dataset, tmp_path / "d")
    file = folder / name
    whole = file.read_text()
    file.write_text("" if line is None else whole + line + "\n")
    with pytest.raises(DataError, match=rf"^{file}{where}: {message}"):
        data.load(folder)
    file.write_text(whole)
    assert data.load(folder) == dataset


def test_chat_template_syntax_error_names_file_and_line(model_copy):
    file = model_copy / "chat_template.jinja"
    file.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(CheckpointError, match=rf"{file}:2: the chat template is not valid Jinja"):
        hf.load_tokenizer(model_copy)
    file.write_text("{% for m in messages %}\n{{ m.content }}\n{% endfor %}")
    assert hf.load_tokenizer(model_copy).apply_chat_template(
        [{"role": "user", "content": "1+2"}], tokenize=False) == "1+2\n"
