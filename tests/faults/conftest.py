"""Shared pieces of the fault-injection suite: experiments imported in-process, a tiny decoder
folder, and checks that a refused run left its results folder as it found it."""

import contextlib
import pathlib
import sys

import pytest

from jaxlab.config import ConfigError
from jaxlab.deepconf import arithmetic
from jaxlab.deepconf.problems import Problem, save_problems
from jaxlab.models import zoo

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))

# train_arithmetic.py at the smallest size that trains (seconds on a CPU).
TINY_TRAINING = ("terms=2", "fit.steps=6", "fit.batch_size=4", "length=40",
                 "fit.optimizer.warmup_steps=1", "fit.optimizer.decay_steps=6", "hidden_size=16",
                 "layers=1", "heads=2", "eval_problems=2", "fit.checkpoint_every=2")


def snapshot(folder: pathlib.Path) -> dict[str, bytes] | None:
    """Every file under `folder` with its bytes (None: no folder)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@contextlib.contextmanager
def refused(capsys, out_dir: pathlib.Path, *names: str):
    """The block must stop with a config error (a usage exit from the command line, or a
    ConfigError / ValueError from the library) whose message names every one of `names`, and
    leave `out_dir` exactly as it was (absent if it was)."""
    before = snapshot(out_dir)
    with pytest.raises((SystemExit, ConfigError, ValueError)) as raised:
        yield
    message = str(raised.value) + capsys.readouterr().err
    for name in names:
        assert name in message, (name, message)
    assert snapshot(out_dir) == before


def skip_eval(patch: pytest.MonkeyPatch) -> None:
    """train_arithmetic.py without its greedy evaluation (the sampler's tests cover it): a
    constant accuracy keeps a run to its training."""
    patch.setattr(arithmetic, "greedy_accuracy", lambda *a: 0.25)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[list[str], pathlib.Path]:
    """A finished tiny train_arithmetic.py run, (argv, folder), started the way a user might:
    first with a bad setting (refused, nothing written), then corrected."""
    import train_arithmetic

    out = tmp_path_factory.mktemp("trained") / "run"
    argv = [f"out_dir={out}", *TINY_TRAINING]
    with pytest.raises(SystemExit):
        train_arithmetic.main([*argv, "fit.steps=1"])
    assert not out.exists()
    with pytest.MonkeyPatch.context() as patch:
        skip_eval(patch)
        train_arithmetic.main(argv)
    return argv, out


@pytest.fixture(scope="session")
def decoder_folder(tmp_path_factory) -> pathlib.Path:
    """A random tiny Qwen3 folder with the arithmetic tokenizer and three problems."""
    folder = zoo.create("qwen3", tmp_path_factory.mktemp("decoder"),
                        vocab_size=len(arithmetic.VOCAB))
    arithmetic.save_tokenizer(folder)
    save_problems([Problem(p.id, p.prompt, p.answer)
                   for p in arithmetic.make_problems(3, 2, seed=0)], folder / "problems.jsonl")
    return folder
