"""A results folder belongs to one run at a time and to the inputs it was started from; an
experiment that stops prints one message for people (cause, path, what to do), exits non-zero,
keeps its traceback in the run's log, and a full disk loses nothing that a rerun needs."""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import deepconf
import pytest
import train_arithmetic
from safetensors.numpy import load_file, save_file

from jaxlab import checkpoint, cli, jsonl, results
from jaxlab.config import ConfigError
from jaxlab.deepconf import arithmetic
from jaxlab.models import zoo
from jaxlab.rl import sft

from .conftest import TINY_TRAINING, skip_eval, snapshot

HOLD = textwrap.dedent("""
    import pathlib, sys, time
    from jaxlab import results
    results.lock_run(pathlib.Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
""")


def holding(folder: pathlib.Path) -> subprocess.Popen:
    """Another process holding `folder`'s run lock (as a running experiment does)."""
    folder.mkdir(parents=True, exist_ok=True)
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                             text=True)
    assert other.stdout.readline().strip() == "locked"
    return other


def stops(capsys, main, argv: list[str], status: int) -> str:
    """What `cli.run(main, argv)` printed on stderr, once it has exited with `status`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run(main, argv)
    assert stopped.value.code == status
    return capsys.readouterr().err


def test_a_second_run_in_a_folder_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    other = holding(out)
    try:
        before = snapshot(out)
        err = stops(capsys, train_arithmetic.main, [f"out_dir={out}", *TINY_TRAINING], 1)
        assert f"{out} is in use by another run (process {other.pid} on " in err
        assert "Traceback" not in err
        assert snapshot(out) == before                      # nothing written or changed
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    other = holding(out)
    other.send_signal(signal.SIGKILL)                      # killed: the lock file still names it
    other.wait()
    assert (out / results.LOCK).read_text().split()[0] == str(other.pid)
    with caplog.at_level("WARNING", "jaxlab"):
        results.open_run(out, {"a": 1})
    assert f"taking over the lock of process {other.pid} on " in caplog.text
    assert "taking over" in (out / "log.txt").read_text()    # in the run's own log too
    assert (out / results.LOCK).read_text().split()[0] == str(os.getpid())
    assert results.lock_run(out) is None                    # held by this process: nothing
    results.close_run_log()


def test_a_run_ended_normally_leaves_no_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), str(out)],
                           capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "locked"
    assert (out / results.LOCK).read_text() == ""           # released at exit
    results.lock_run(out)


@pytest.fixture
def model_copy(tmp_path, decoder_folder):
    return shutil.copytree(decoder_folder, tmp_path / "model")


def test_resuming_from_a_changed_model_is_refused_naming_what_changed(tmp_path, model_copy):
    out = tmp_path / "run"
    argv = [f"out_dir={out}", f"model={model_copy}", f"task.path={model_copy / 'problems.jsonl'}",
            "max_new_tokens=4", "group_size=2", "offline_traces=2", "ks=[2]", "warmup=2",
            "batch=2", "window=2", "rules=[deepconf-low]", "task.eval_limit=1"]
    deepconf.main(argv)
    recorded = json.loads((out / results.INPUTS).read_text())
    assert sorted(recorded) == ["model", "task"]
    width = recorded["model"]["fingerprint"]["config.json:hidden_size"]
    # The base model replaced under the same path by a narrower one.
    zoo.create("qwen3", model_copy, vocab_size=len(arithmetic.VOCAB), hidden_size=width // 2)
    before = snapshot(out)
    with pytest.raises(ConfigError) as refused:
        deepconf.main(argv)
    message = str(refused.value)
    assert f"{out} was started from other inputs" in message
    assert f"model ({model_copy}): config.json:hidden_size: {width} -> {width // 2}" in message
    assert "task (" not in message                          # the problems did not change
    assert snapshot(out) == before                          # kept as it was


def test_inputs_name_each_change(tmp_path, model_copy):
    out = tmp_path / "run"
    out.mkdir()
    problems = model_copy / "problems.jsonl"
    results.check_inputs(out, model=model_copy, problems=problems)
    results.check_inputs(out, model=model_copy, problems=problems)      # unchanged: resumes
    tokenizer = model_copy / "tokenizer.json"
    sha = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12]
    text = tokenizer.read_text()
    assert '"<eos>"' in text
    tokenizer.write_text(text.replace('"<eos>"', '"<end>"'))
    added = '{"id": "x", "prompt": "1+1=", "answer": "2"}\n'
    with problems.open("a") as f:
        f.write(added)
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mlp.up_proj.weight"               # [intermediate, hidden]
    shape = list(tensors[name].shape)
    tensors[name] = tensors[name][:-1]                       # one row fewer, config unchanged
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError) as refused:
        results.check_inputs(out, model=model_copy, problems=problems)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith(f"{out} was started from other inputs")
    now = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12]
    assert lines[1] == (f"  model ({model_copy}): tensor:{name}: F32{shape} -> "
                        f"F32{[shape[0] - 1, shape[1]]}; tokenizer.json:sha256: {sha} -> {now}")
    size = problems.stat().st_size
    assert lines[2].startswith(f"  problems ({problems}): sha256: ")
    assert lines[2].endswith(f"; size: {size - len(added)} -> {size}")
    results.check_inputs(out, other=problems)               # a new input is added
    assert "other" in json.loads((out / results.INPUTS).read_text())


def test_an_error_is_one_message_and_its_traceback_goes_to_the_log(tmp_path, trained, capsys):
    argv, _ = trained
    out = tmp_path / "run"
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"id": "a", "prompt": "1+1=", "answer": "2"}\n{"id": "b", "prompt": 3}\n')
    deepconf_argv = [f"out_dir={out}", f"model={trained[1]}", f"task.path={bad}"]
    err = stops(capsys, deepconf.main, deepconf_argv, 1)    # before the run's folder exists
    assert err.startswith(f"error: {bad}:2: ") and "--debug prints the traceback" in err
    assert "Traceback" not in err
    err = stops(capsys, deepconf.main, [*deepconf_argv, "--debug"], 1)
    assert "Traceback (most recent call last)" in err

    err = stops(capsys, train_arithmetic.main, [*argv[1:], f"out_dir={out}", "fit.steps=0"],
                2)                                          # a bad value: a usage error
    assert "FitConfig.steps must be an integer >= 1, got 0" in err


def test_a_full_disk_loses_nothing_and_a_rerun_resumes(tmp_path, monkeypatch, trained, capsys):
    _, whole = trained                                      # the uninterrupted run
    skip_eval(monkeypatch)
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    append = jsonl.append_record

    def full_at_step_5(path, record):
        if record.get("step") == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        append(path, record)

    monkeypatch.setattr(jsonl, "append_record", full_at_step_5)
    err = stops(capsys, train_arithmetic.main, [f"out_dir={out}", *TINY_TRAINING], 1)
    assert f"error: no space left to write {metrics} (No space left on device)" in err
    assert "Traceback" not in err and "OSError" in (out / "log.txt").read_text()
    every = jsonl.resume_records(whole / "metrics.jsonl")
    assert every[-1]["step"] == 5                           # the record that did not fit
    assert jsonl.resume_records(metrics) == every[:-1]      # every one before it is kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    monkeypatch.setattr(jsonl, "append_record", append)     # space again
    cli.run(train_arithmetic.main, [f"out_dir={out}", *TINY_TRAINING])
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert ((out / "train_metrics.json").read_text()
            == (whole / "train_metrics.json").read_text())


def test_no_permission_is_named_with_what_to_do(tmp_path, monkeypatch, capsys):
    out = tmp_path / "read_only" / "run"
    mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    err = stops(capsys, train_arithmetic.main, [f"out_dir={out}", *TINY_TRAINING], 1)
    assert f"error: permission denied for {out} (Permission denied): change its" in err
    assert "Traceback" not in err


def test_sigterm_stops_at_a_step_and_a_rerun_resumes(tmp_path, monkeypatch, trained, capsys):
    _, whole = trained
    skip_eval(monkeypatch)
    out = tmp_path / "run"
    step, calls = sft._step, []

    def terminated_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)            # as `kill PID` does
        return step(*args, **kwargs)

    monkeypatch.setattr(sft, "_step", terminated_at_step_4)
    handler = signal.getsignal(signal.SIGTERM)
    err = stops(capsys, train_arithmetic.main, [f"out_dir={out}", *TINY_TRAINING], 143)
    assert err.splitlines()[-1] == (
        "stopped (SIGTERM); a rerun resumes from what was written")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert signal.getsignal(signal.SIGTERM) is handler      # put back
    monkeypatch.setattr(sft, "_step", step)
    cli.run(train_arithmetic.main, [f"out_dir={out}", *TINY_TRAINING])
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_a_full_disk_under_orbax_is_named_with_its_folder():
    # The error Orbax raises when TensorStore cannot write a checkpoint (its text as written
    # on a full 7 MiB tmpfs).
    folder = "/mnt/small/run/checkpoints/10.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/"
    error = ValueError(
        f'RESOURCE_EXHAUSTED: Error writing "key/0" in OCDBT database at local file "{folder}":'
        f' Failed writing: "{folder}d/f50c71a6": Failed to write 467854 bytes to file 6: No '
        f"space left on device [os_error_code='28']")
    assert cli.describe(error) == (
        f"no space left to write {folder} (No space left on device): free some space, or "
        f"choose an out_dir on another disk, and rerun; it resumes from what was written")
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = PermissionError(errno.EROFS, os.strerror(errno.EROFS), "/ro/run")
    assert cli.describe(wrapped).startswith("permission denied for /ro/run (Read-only file")
    # jaxlab's own error keeps its message, also when raised while handling an OSError.
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/x/run.lock")
        except OSError:
            raise results.RunLocked("/x is in use by another run (process 7 on h)") from None
    except results.RunLocked as e:
        assert cli.describe(e) == "/x is in use by another run (process 7 on h)"
    saving = checkpoint.SaveError("could not write checkpoint 4 in /x/checkpoints")
    saving.__cause__ = error
    assert cli.describe(saving) == (
        "could not write checkpoint 4 in /x/checkpoints (No space left on device); free some "
        "space, or choose an out_dir on another disk, and rerun; it resumes from what was "
        "written")
    assert cli.describe(KeyError("x")) == "KeyError: 'x'"
    step = subprocess.CalledProcessError(1, [sys.executable, "experiments/deepconf.py", "a=b"])
    assert cli.describe(step) == ("experiments/deepconf.py stopped with exit status 1 (its "
                                  "message is above)")
    step = subprocess.CalledProcessError(2, [sys.executable, "-m", "pytest", "-q"])
    assert cli.describe(step).startswith("pytest stopped with exit status 2")
