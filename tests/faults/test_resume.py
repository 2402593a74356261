"""Resume after a kill: a training job restarted from its checkpoints ends bit for bit where the
uninterrupted run does, a damaged latest checkpoint is skipped with a warning naming it, and a
results file cut mid-append is repaired; summaries describe exactly the config beside them."""

import json
import logging

import deepconf
import numpy as np
import pytest
import train_arithmetic

from jaxlab import jsonl
from jaxlab.rl import sft

from .conftest import TINY_TRAINING, skip_eval


class Killed(Exception):
    """Stands for a kill at a chosen step."""


def test_train_arithmetic_resumes_exactly_past_a_damaged_checkpoint(                # 24, 25
        tmp_path, monkeypatch, trained, caplog):
    _, whole = trained                                    # the uninterrupted run
    skip_eval(monkeypatch)
    want = json.loads((whole / "train_metrics.json").read_text())
    step = sft._step
    calls = []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return step(*args, **kwargs)

    cut = tmp_path / "cut"
    monkeypatch.setattr(sft, "_step", dies_at_step_5)
    with pytest.raises(Killed):
        train_arithmetic.main([f"out_dir={cut}", *TINY_TRAINING])
    monkeypatch.setattr(sft, "_step", step)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["2", "4"]
    (cut / "checkpoints" / "4" / "default" / "_METADATA").write_text("{")   # damaged
    with caplog.at_level(logging.INFO, "jaxlab"):
        got = train_arithmetic.main([f"out_dir={cut}", *TINY_TRAINING])
    assert f"checkpoint {cut / 'checkpoints' / '4'} cannot be restored" in caplog.text
    assert "resuming from step 2" in caplog.text
    assert got == want
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_deepconf_partial_line_and_smaller_eval_limit(tmp_path, decoder_folder, caplog):  # 23, 28
    out = tmp_path / "run"
    argv = [f"out_dir={out}", f"model={decoder_folder}",
            f"task.path={decoder_folder / 'problems.jsonl'}", "max_new_tokens=4", "group_size=2",
            "offline_traces=2", "ks=[2]", "warmup=2", "batch=2", "window=2",
            "rules=[deepconf-low]"]
    deepconf.main([*argv, "task.eval_limit=2"])
    records = out / "problems.jsonl"
    complete = records.read_bytes()
    with records.open("ab") as f:                         # a kill mid-append of problem 3
        f.write(b'{"id": "sum2-2", "answer": "1')
    with caplog.at_level(logging.WARNING, "jaxlab"):
        summary = deepconf.main([*argv, "task.eval_limit=1"])  # fewer than the file holds
    assert f"{records}:3: dropping a partial last line" in caplog.text
    assert records.read_bytes() == complete
    first = json.loads(complete.splitlines()[0])
    assert summary["problems"] == 1
    assert summary["offline"]["2"]["pass@1"] == first["offline"]["2"]["pass@1"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["problems"] == 1 and saved["offline"] == summary["offline"]
    summary = deepconf.main([*argv, "task.eval_limit=3"])  # the cut problem is redone
    again = jsonl.resume_records(records)
    assert [r["id"] for r in again] == ["sum2-0", "sum2-1", "sum2-2"]
    assert records.read_bytes().startswith(complete) and summary["problems"] == 3
    assert np.isclose(summary["offline"]["2"]["tokens"],
                      np.mean([r["offline"]["2"]["tokens"] for r in again]))
