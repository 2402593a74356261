"""The workloads a multi-process run and a single-process run of as many devices must agree on
(tests/parallel/test_multiprocess.py)."""

import dataclasses
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import arrays, jsonl, parallel, results
from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.limit import free_embedding as fe
from jaxlab.models import hf
from jaxlab.models.decoder import Decoder, DecoderConfig
from jaxlab.rl import loop, sft, train
from tests.rl import loop_job

SOLVER = fe.SolverConfig(check_every=10, patience=200, steps=500)
TINY = DecoderConfig(family="qwen3", vocab_size=32, hidden_size=16, intermediate_size=32,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
CONFIG = train.TrainConfig(optimizer=train.OptimizerConfig(learning_rate=1e-2))


def free_embedding_batch() -> dict[str, np.ndarray]:
    """8 runs (seeds x n) split over a RUNS mesh of every device."""
    runs = fe.solve([0, 1, 2, 3] * 2, [5, 5, 6, 6, 7, 7, 8, 8], 3, SOLVER,
                    mesh=parallel.make_mesh(parallel.RUNS))
    return {"solved": runs.solved, "steps": runs.steps, "loss": runs.loss}


def policy_step(checkpoints: str | None = None) -> dict[str, np.ndarray]:
    """One data-parallel policy step of a tiny decoder on 16 rows over a DATA mesh; with
    `checkpoints` (a folder), also the state after it ("state:") and that state saved and
    restored under other meshes ("restored:", `checkpoint_round_trip`) and whole on each
    process ("whole:", `whole_state_round_trip`)."""
    mesh = parallel.make_mesh(parallel.DATA)
    graphdef, state = train.init_train_state(Decoder(TINY, nnx.Rngs(0)), CONFIG.optimizer,
                                             jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, (16, 8)).astype(np.int32)
    mask = np.ones((16, 8), np.int32)
    logp = np.asarray(train.policy_logprobs(graphdef, state.params, tokens, mask))
    batch = train.PolicyBatch(
        tokens=tokens, mask=mask, loss_mask=np.ones((16, 8), np.float32),
        old_logp=logp + rng.normal(0, 0.1, logp.shape).astype(np.float32), ref_logp=logp,
        advantages=rng.choice([-1.0, 1.0], 16).astype(np.float32))
    state = parallel.put(state, parallel.replicated(mesh))
    batch = parallel.put(batch, parallel.batch_sharding(mesh))
    state, metrics = train.train_step(state, batch, graphdef=graphdef, config=CONFIG, mesh=mesh,
                                      temperature=1.0)
    params = {"/".join(map(str, path)): parallel.host_array(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(
                  nnx.to_pure_dict(state.params))}
    found = {**{f"param:{k}": v for k, v in params.items()},
             **{f"metric:{k}": parallel.host_array(v) for k, v in metrics.items()}}
    if checkpoints is not None:
        found.update({f"state:{k}": v for k, v in host_leaves(state).items()})
        found.update({f"restored:{k}": v
                      for k, v in checkpoint_round_trip(state, checkpoints).items()})
        found.update({f"whole:{k}": v for k, v in whole_state_round_trip(
            state, f"{checkpoints}.whole").items()})
    return found


def abstract_state() -> train.TrainState:
    """Shapes and dtypes of the tiny decoder's train state."""
    return jax.eval_shape(lambda: train.init_train_state(
        Decoder(TINY, nnx.Rngs(0)), CONFIG.optimizer, jax.random.key(0))[1])


def host_leaves(tree) -> dict[str, np.ndarray]:
    """Every array of `tree` (of any process's devices) as NumPy, PRNG keys as their key data,
    by its path."""
    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return parallel.host_array(x)

    return {jax.tree_util.keystr(path): host(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def checkpoint_round_trip(state: train.TrainState, directory: str) -> dict[str, np.ndarray]:
    """`state` split over an FSDP mesh of every device, saved into `directory` (by every
    process) at its step, and restored split over a (fsdp=2, tensor=rest) mesh."""
    config = CheckpointConfig(best_metric=None, async_save=False)
    split = parallel.tree_shardings(state, parallel.make_train_mesh(fsdp=jax.device_count()))
    state = jax.jit(lambda tree: tree, out_shardings=split)(state)
    with Checkpointer(directory, config) as checkpointer:
        checkpointer.save(int(parallel.host_array(state.step)), state)
    abstract = abstract_state()
    mesh = parallel.make_train_mesh(fsdp=2, tensor=jax.device_count() // 2)
    with Checkpointer(directory, config) as checkpointer:
        restored = checkpointer.restore(abstract, shardings=parallel.tree_shardings(abstract,
                                                                                    mesh))
    return host_leaves(restored)


def whole_state_round_trip(state: train.TrainState, directory: str) -> dict[str, np.ndarray]:
    """`state` held whole by each process on its first device (as when each process trains the
    same model alone), saved into `directory` by every process and restored so again."""
    config = CheckpointConfig(best_metric=None, async_save=False)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), device), state)
    with Checkpointer(directory, config) as checkpointer:
        checkpointer.save(1, state)
    with Checkpointer(directory, config) as checkpointer:
        restored = checkpointer.restore(state)
    assert all(x.sharding == device for x in jax.tree.leaves(restored))
    return host_leaves(restored)


def distinct_state() -> train.TrainState:
    """The tiny decoder's train state with every float array (parameters, Adam moments) drawn
    anew and the step at 7, so that a restore that mixed up or dropped arrays would show."""
    _, state = train.init_train_state(Decoder(TINY, nnx.Rngs(0)), CONFIG.optimizer,
                                      jax.random.key(0))
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
              else x for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, leaves).replace(step=jnp.int32(7))


def results_files(folder: str) -> None:
    """Every kind of results write (JSON, JSON Lines and metrics appends, a row store, a
    figure) into `folder`, as every process of a run makes them; each process then reads back
    what was written (AssertionError if it differs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = pathlib.Path(folder)
    results.write_json(folder / "summary.json", {"processes": jax.process_count()})
    for i in range(3):
        jsonl.append_record(folder / "records.jsonl", {"i": i})
    jsonl.append_record(folder / "metrics.jsonl", {"step": 0})
    jsonl.truncate_records(folder / "metrics.jsonl", 1, "step")
    store = arrays.open_store(folder / "store", {"x": ((5, 2), "float32")}, chunk_rows=2)
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    assert arrays.fill(store, lambda start, stop: {"x": rows[start:stop]}) == [0, 1, 2]
    figure = plt.figure()
    results.save_figure(figure, folder / "figure.png")
    plt.close(figure)
    assert jsonl.resume_records(folder / "records.jsonl") == [{"i": i} for i in range(3)]
    assert results.read_json(folder / "summary.json") == {"processes": jax.process_count()}
    np.testing.assert_array_equal(arrays.read(store, "x"), rows)


def run_all(checkpoints: str | None = None) -> dict[str, np.ndarray]:
    return {**{f"runs:{k}": v for k, v in free_embedding_batch().items()},
            **policy_step(checkpoints)}


# Two iterations of the RL loop (sampling, an exact reward on the host, 2 optimizer steps each)
# and a checkpoint after each, on 16 rows.
RL_CONFIG = dataclasses.replace(loop_job.config(2), checkpoint_every=1)


def rl_run(out_dir: str, mesh: jax.sharding.Mesh | None = None, name: str = "rl",
           ) -> dict[str, np.ndarray]:
    """`loop.run` of loop_job's tiny decoder over `mesh` (default: a DATA mesh of every device)
    into `out_dir`, and the trained policy saved by `hf.save_pretrained` into `out_dir`/policy:
    the metrics ("<name>:<metric>", one value per iteration; not the timings) and final
    parameters ("<name>:param:<path>")."""
    graphdef, state = loop.run(Decoder(loop_job.CONFIG, nnx.Rngs(0)), loop_job.prompt_fn,
                               loop_job.reward_fn, RL_CONFIG, out_dir, key=jax.random.key(0),
                               mesh=mesh or parallel.make_mesh(parallel.DATA))
    hf.save_pretrained(nnx.merge(graphdef, state.params), pathlib.Path(out_dir) / "policy")
    records = jsonl.resume_records(pathlib.Path(out_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1], records
    found = {f"{name}:{metric}": np.asarray([r[metric] for r in records])
             for metric in records[0] if "seconds" not in metric and not metric.endswith("_per_s")}
    found.update({f"{name}:param:{k}": v for k, v in host_leaves(state.params).items()})
    return found


def audit_writes(folder: str, exclude: str) -> list[str]:
    """From now on, records each file or folder this process opens for writing, creates, renames
    or removes under `folder` but outside its subfolder `exclude` (Python's audit events); returns
    the list that it fills."""
    root, skip = pathlib.Path(folder).resolve(), pathlib.Path(folder).resolve() / exclude
    seen: list[str] = []

    def writes(event: str, args: tuple) -> bool:
        if event == "open":
            mode, flags = args[1], args[2]
            return (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR
                                                                          | os.O_CREAT)))
        return event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree")

    def hook(event: str, args: tuple) -> None:
        if not writes(event, args) or not isinstance(args[0], (str, os.PathLike)):
            return
        path = pathlib.Path(os.fsdecode(args[0])).resolve()
        if path.is_relative_to(root) and not path.is_relative_to(skip):
            seen.append(f"{event} {path.relative_to(root)}")

    sys.addaudithook(hook)
    return seen


SFT_CONFIG = sft.FitConfig(steps=4, batch_size=16, microbatches=2, log_every=1,
                           checkpoint_every=2, optimizer=train.OptimizerConfig(
                               learning_rate=1e-2, warmup_steps=0))


def sft_run(out_dir: str, mesh: jax.sharding.Mesh | None, name: str = "sft",
            ) -> dict[str, np.ndarray]:
    """4 steps of `sft.fit` (2 micro-batches of 8 rows each) of the tiny decoder on 32 random
    (prompt, target) pairs, on `mesh`: the logged losses ("<name>:loss") and final parameters
    ("<name>:param:<path>")."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, TINY.vocab_size, rng.integers(1, 5)).tolist() for _ in range(32)]
    targets = [rng.integers(3, TINY.vocab_size, rng.integers(1, 4)).tolist() for _ in range(32)]
    model = sft.fit(Decoder(TINY, nnx.Rngs(2)), sft.sft_loss, sft.sft_batch(prompts, targets, 8),
                    SFT_CONFIG, out_dir, key=jax.random.key(3), mesh=mesh)
    records = jsonl.resume_records(pathlib.Path(out_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3], records
    return {f"{name}:loss": np.asarray([r["loss"] for r in records]),
            **{f"{name}:param:{k}": v
               for k, v in host_leaves(nnx.state(model, nnx.Param)).items()}}


def failure_on_the_last_process() -> str:
    """What `results.together` raises on this process when its step raises OSError on the last
    process only ("<type>: <message>")."""
    def step():
        if jax.process_index() == jax.process_count() - 1:
            raise OSError("no space left on device")

    try:
        results.together(step, "a test step")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "nothing"
