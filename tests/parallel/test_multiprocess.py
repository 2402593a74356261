import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlab import parallel
from jaxlab.checkpoint import CheckpointConfig, Checkpointer
from jaxlab.models import hf
from tests.parallel import workloads

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
import critical_n  # experiments/critical_n.py

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out, processes=2, devices=4, wait_s=600, **env_overrides):
    """Runs multiprocess_job.py as `processes` processes of `devices` CPU devices each, with
    its checkpoints in the folder `out`.checkpoints and its results files in `out`.files."""
    return _launch_command([sys.executable, "-m", "tests.parallel.multiprocess_job", str(out),
                            f"{out}.checkpoints", f"{out}.files"], processes, devices,
                           wait_s=wait_s, **env_overrides)


def _launch_command(command, processes=2, devices=4, cwds=None, wait_s=600, **env_overrides):
    """Runs `command` as `processes` processes of `devices` CPU devices each (process i in
    `cwds[i]`, default the repository); returns each one's (exit code, output), failing if one
    is still running after `wait_s` seconds."""
    port = _free_port()
    base = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{os.environ['XLA_FLAGS']} "  # the last device count wins
                f"--xla_force_host_platform_device_count={devices}",
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
    children = [subprocess.Popen(
        command, cwd=ROOT if cwds is None else cwds[i],
        env={**base, "JAX_PROCESS_ID": str(i), **env_overrides}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    try:
        return [(child.wait(timeout=wait_s), child.stdout.read()) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_two_processes_equal_one_process_of_as_many_devices(tmp_path):
    # 2 processes x 4 CPU devices (gloo collectives) against this process's 8 devices: the
    # free-embedding runs and the policy step (its gradient all-reduced across processes) agree,
    # a checkpoint written by both processes (Orbax) restores there and here, and results files
    # are written once.
    out = tmp_path / "multi.npz"
    for code, log in _launch(out):
        assert code == 0, log
    multi = dict(np.load(out))
    assert jax.device_count() == 8
    single = workloads.run_all()
    # The state after the step, saved by both processes: restored under (fsdp=2, tensor=4)
    # across them and here on one device, it is the state that was saved; so is a copy that
    # each process holds whole, saved and restored so.
    one_device = jax.tree.map(lambda _: parallel.replicated(parallel.single_device_mesh()),
                              workloads.abstract_state())
    with Checkpointer(f"{out}.checkpoints", CheckpointConfig(best_metric=None)) as ckpt:
        assert ckpt.all_steps() == [1]
        here = workloads.host_leaves(ckpt.restore(workloads.abstract_state(),
                                                  shardings=one_device))
    saved = {k.removeprefix("state:"): multi.pop(k) for k in list(multi) if k.startswith("state:")}
    assert set(here) == set(saved) and len(saved) > 20
    for name, value in saved.items():
        np.testing.assert_array_equal(multi.pop(f"restored:{name}"), value, err_msg=name)
        np.testing.assert_array_equal(multi.pop(f"whole:{name}"), value, err_msg=name)
        np.testing.assert_array_equal(here[name], value, err_msg=name)
    # The RL run (2 iterations of sampling, rewards and 2 optimizer steps): the same metrics and
    # final parameters as one process of as many devices, checkpoints after each iteration, and
    # the trained policy saved as the parameters it ended with. Process 0 alone wrote its files
    # (metrics, config, weights; the checkpoints are Orbax's, written by both).
    single.update(workloads.rl_run(str(tmp_path / "single.rl")))
    # SFT over the same mesh, and here also on one device. XLA partitions its step and sums the
    # gradient over the devices in an order of its choosing, which differs with the processes:
    # the runs agree to float rounding (1e-6 of parameters of about 1e-2 after 4 AdamW steps
    # of 1e-2, whose normalized updates magnify rounding in small gradients).
    sft_single = workloads.sft_run(str(tmp_path / "single.sft"),
                                   parallel.make_mesh(parallel.DATA))
    for other in (workloads.sft_run(str(tmp_path / "one_device.sft"), None),
                  {name: multi.pop(name) for name in sft_single}):
        for name, value in sft_single.items():
            np.testing.assert_allclose(other[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # RL and SFT with the state split over fsdp = the 8 devices of both processes: the metrics
    # of one process of 8 devices on the same mesh to float rounding, and its parameters but
    # where rounding flips the sign of a near-zero gradient (an Adam step of about lr * sign(g):
    # all entries within 2 lr per step, all but a few within 1e-6).
    split = parallel.make_train_mesh(1, 8, 1)
    for run, steps, rate in (
            (workloads.rl_run(str(tmp_path / "single.rl_fsdp"), split, "rl_fsdp"), 4,
             workloads.RL_CONFIG.train.optimizer.learning_rate),
            (workloads.sft_run(str(tmp_path / "single.sft_fsdp"), split, "sft_fsdp"), 4,
             workloads.SFT_CONFIG.optimizer.learning_rate)):
        params = [name for name in run if ":param:" in name]
        assert len(params) > 5
        for name in set(run) - set(params):
            np.testing.assert_allclose(multi.pop(name), run[name], rtol=1e-5, atol=1e-6,
                                       err_msg=name)
        diffs = np.concatenate([np.abs(multi.pop(name) - run[name]).ravel() for name in params])
        assert diffs.max() <= 2 * rate * steps and np.mean(diffs <= 1e-6) > 0.995, diffs.max()
    assert len([k for k in single if k.startswith("rl:param:")]) > 5
    assert set(multi) == set(single)
    for name, value in single.items():
        np.testing.assert_allclose(multi[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    rl = tmp_path / "multi.npz.rl"
    with Checkpointer(rl / "checkpoints", CheckpointConfig(best_metric=None)) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    saved = hf.load_pretrained(rl / "policy")
    for path, value in workloads.host_leaves(nnx.state(saved, nnx.Param)).items():
        np.testing.assert_array_equal(value, multi[f"rl:param:{path}"], err_msg=path)
    processes = [json.loads((tmp_path / f"multi.npz.process{i}.json").read_text())
                 for i in (0, 1)]
    writes = [process["writes"] for process in processes]
    assert writes[1] == [], writes[1]
    assert {"open metrics.jsonl", "os.mkdir policy",
            "os.rename policy/model.safetensors.partial"} <= set(writes[0]), writes[0]
    # A step that raised on process 1 alone raised on both: there its own error, on process 0
    # one naming process 1 (instead of waiting for it in the next collective).
    assert processes[1]["failure"] == "OSError: no space left on device"
    assert processes[0]["failure"] == ("RuntimeError: a test step failed on process [1] (see its "
                                       "log); process 0 stops with it")
    # Each process wrote and read back every kind of results file; process 0 alone wrote them:
    # each appended record is there once, not once per process.
    files = tmp_path / "multi.npz.files"
    assert (files / "records.jsonl").read_text() == "".join(f'{{"i": {i}}}\n' for i in range(3))
    assert (files / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert json.loads((files / "summary.json").read_text()) == {"processes": 2}
    assert (files / "figure.png").read_bytes().startswith(b"\x89PNG")


def test_a_partial_launch_environment_is_named(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        parallel.initialize_processes()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must lie in \[0, "):
        parallel.initialize_processes()


def test_no_launch_environment_means_one_process(monkeypatch):
    for name in (*parallel.PROCESS_ENV, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_processes() == 1


def test_a_coordinator_that_never_answers_stops_with_a_clear_error(tmp_path):
    # Process 1 of 2 waits for a coordinator that never starts: it must give up, not hang.
    code, log = _launch(tmp_path / "none.npz", processes=1, JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID="1", JOB_TIMEOUT_S="2")[0]
    assert code != 0 and "did not answer within 2 s" in log, log



def test_a_run_missing_a_process_stops_at_the_deadline(tmp_path):
    # 2 processes of a launch that announces 3: both (the coordinator's and the other) stop when
    # the third has not joined within the timeout, JAX naming the deadline, instead of waiting.
    for code, log in _launch(tmp_path / "none.npz", JAX_NUM_PROCESSES="3", JOB_TIMEOUT_S="3",
                             wait_s=120):
        assert code != 0 and "deadline" in log.lower(), log


# Each process reads its own first device of a mesh of both processes' devices (the mesh's
# first device is not addressable on process 1) and is told it has (1 + its index) GiB free.
FREE_BYTES = """
from jaxlab import parallel
parallel.initialize_processes(timeout_s=60)
import jax
parallel.device_memory_bytes = lambda device: (1 + jax.process_index()) * 2**30
print("free", parallel.free_bytes(parallel.make_mesh()), flush=True)
"""


def test_every_process_of_a_run_reads_the_least_free_memory_so_all_decide_alike():
    runs = _launch_command([sys.executable, "-c", FREE_BYTES], wait_s=120)
    for code, log in runs:
        assert code == 0, log
    assert [log.split("free ")[1].split()[0] for _, log in runs] == [str(2**30)] * 2


# A small critical-n sweep (experiments/critical_n.py); a fixed memory budget, so that the calls
# are sized alike whatever memory the host has free.
SWEEP = ["d_min=2", "d_max=2", "start_n=3", "seeds=2", "window=2", "segment_steps=100",
         "solver.steps=1000", "solver.patience=300", "memory_gib=1", "out_dir=run"]


def test_an_experiment_of_two_processes_writes_once_what_one_process_writes(tmp_path):
    # Each process runs in its own folder with the same relative out_dir: process 0's folder
    # holds the results, process 1's nothing; they equal those of one process of 8 devices.
    folders = [tmp_path / "process0", tmp_path / "process1"]
    for folder in folders:
        folder.mkdir()
    script = os.path.join(ROOT, "experiments", "critical_n.py")
    for code, log in _launch_command([sys.executable, script, *SWEEP], cwds=folders):
        assert code == 0, log
    assert list(folders[1].iterdir()) == []
    multi = folders[0] / "run"
    assert sorted(p.name for p in multi.iterdir()) == [
        "config.yaml", "curve.png", "fit.json", "log.txt", "results.json", "run.lock"]
    assert "critical-n sweep d=2..2" in (multi / "log.txt").read_text()

    single = tmp_path / "single"
    critical_n.main([*SWEEP[:-1], f"out_dir={single}"])
    untimed = [{k: v for k, v in record.items() if k != "seconds"}
               for record in json.loads((single / "results.json").read_text())]
    assert [r["d"] for r in untimed] == [2] and untimed[0]["tried"] == {"3": True, "4": False}
    assert [{k: v for k, v in record.items() if k != "seconds"}
            for record in json.loads((multi / "results.json").read_text())] == untimed
    assert json.loads((multi / "fit.json").read_text()) == json.loads(
        (single / "fit.json").read_text())
    assert (multi / "config.yaml").read_text() == (single / "config.yaml").read_text().replace(
        f"out_dir: {single}", "out_dir: run")


MISMATCH_JOB = """
import sys
from jaxlab import parallel
parallel.initialize_processes(timeout_s=60)
import jax, jax.numpy as jnp
from jaxlab.checkpoint import CheckpointConfig, Checkpointer, CheckpointMismatch
config = CheckpointConfig(best_metric=None, async_save=False)
with Checkpointer(sys.argv[1], config) as checkpointer:
    checkpointer.save(1, {"w": jnp.ones(4)})
    try:
        checkpointer.restore({"w": jnp.zeros(8 if jax.process_index() == 1 else 4)})
    except CheckpointMismatch as e:
        print("CheckpointMismatch:", str(e).splitlines()[0])
"""


def test_a_mismatch_seen_by_one_process_stops_every_one(tmp_path):
    """Process 1 restores into a wider state than the one saved, process 0 into the same: both
    raise CheckpointMismatch (process 0 naming the other's finding), neither reads or waits."""
    (zero, first), (one, second) = _launch_command(
        [sys.executable, "-c", MISMATCH_JOB, str(tmp_path)], devices=1, wait_s=180)
    assert zero == one == 0, first + second
    assert (f"CheckpointMismatch: checkpoint {tmp_path / '1'} holds another model or config than "
            f"the state restored into (stored vs requested):") in second
    assert "the state restored into, as another process found" in first
