"""One process of a multi-process run (launched by test_multiprocess.py with PROCESS_ENV set):
a batch of free-embedding runs and one policy step over a mesh of every process's devices, the
state after it saved by every process into the checkpoint folder argv[2] and restored under
another mesh, every kind of results write into the folder argv[3], an RL run
(`workloads.rl_run`) into the folder argv[1].rl, an SFT run into argv[1].sft, both again on an
fsdp mesh of every device (argv[1].rl_fsdp, argv[1].sft_fsdp), and a step that
fails on process 1 only (`workloads.failure_on_the_last_process`); process 0 writes the results
to the .npz file named by argv[1], and each process i to argv[1].process<i>.json the files it
wrote into the RL folder (outside its checkpoints) and what the failing step raised there."""

import json
import os
import sys

from jaxlab import parallel

parallel.initialize_processes(timeout_s=int(os.environ.get("JOB_TIMEOUT_S", "60")))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.parallel import workloads  # noqa: E402

results = workloads.run_all(checkpoints=sys.argv[2])
workloads.results_files(sys.argv[3])
writes = workloads.audit_writes(f"{sys.argv[1]}.rl", exclude="checkpoints")
results.update(workloads.rl_run(f"{sys.argv[1]}.rl"))
results.update(workloads.sft_run(f"{sys.argv[1]}.sft", parallel.make_mesh(parallel.DATA)))
split = parallel.make_train_mesh(1, 8, 1)  # the state split over both processes' devices
results.update(workloads.rl_run(f"{sys.argv[1]}.rl_fsdp", split, "rl_fsdp"))
results.update(workloads.sft_run(f"{sys.argv[1]}.sft_fsdp", split, "sft_fsdp"))
failure = workloads.failure_on_the_last_process()
with open(f"{sys.argv[1]}.process{jax.process_index()}.json", "w") as f:
    json.dump({"writes": writes, "failure": failure}, f)
if jax.process_index() == 0:
    np.savez(sys.argv[1], **results)
