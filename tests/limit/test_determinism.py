"""The same search on the same code and machine gives the same numbers, bit for bit, whatever the
batch a run shares and whatever memory sized the batches: a run is only ever computed in the shape
its own n fixes (`free_embedding.doc_slots`, at least MIN_RUNS_PER_DEVICE runs per device).

The settings sit at d = 4 near its critical n, where optimization is chaotic: a one-ulp difference
in a padded reduction changes the final loss, and often whether a run is solved."""

import numpy as np
import pytest

from jaxlab.limit import critical_n as cn
from jaxlab.limit import free_embedding as fe

SOLVER = fe.SolverConfig(check_every=10, patience=200, steps=1500)


def _equal(a: fe.RunResult, i: int, b: fe.RunResult, j: int) -> None:
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert np.asarray(x)[i].tobytes() == np.asarray(y)[j].tobytes(), (name, x[i], y[j])


@pytest.mark.parametrize("use_mesh", [False, True])
def test_a_run_is_the_same_bits_in_any_batch(use_mesh, mesh8):
    mesh = mesh8 if use_mesh else None
    alone = fe.solve([42], [10], 4, SOLVER, mesh=mesh)
    # partners of the same slots (seeds), of other slots (n = 7, 16: another batch), and a
    # batch large enough to be split differently over the devices
    crowd = fe.solve([40, 41, 42, 43, 42, 42] * 3, [10, 10, 10, 10, 7, 16] * 3, 4, SOLVER,
                     mesh=mesh)
    for j in (2, 8, 14):
        _equal(alone, 0, crowd, j)
    assert fe.doc_slots(10) == 10 and fe.doc_slots(16) == 16 and fe.doc_slots(17) == 18


def test_doc_slots_pad_by_less_than_an_eighth():
    for n in range(2, 5000):
        slots = fe.doc_slots(n)
        assert n <= slots < n + max(1, n / 8), n
        assert fe.doc_slots(slots) == slots  # neighbours of n share its shape
    assert [fe.doc_slots(n) for n in (15, 16, 17, 33, 65, 129)] == [15, 16, 18, 36, 72, 144]


def test_batch_size_keeps_two_runs_per_device():
    assert [fe.batch_size(r, 1) for r in (1, 2, 3)] == [2, 2, 3]
    assert [fe.batch_size(r, 8) for r in (1, 16, 17)] == [16, 16, 24]


@pytest.mark.parametrize("protocol", ["multi_seed", "paper"])
def test_a_search_gives_the_same_answer_whatever_the_memory(protocol, mesh8):
    def run(memory_bytes):
        if protocol == "paper":
            return cn.paper_search(4, start=6, config=SOLVER, mesh=mesh8,
                                   memory_bytes=memory_bytes, segment_steps=50)
        return cn.search(4, start=6, seeds=3, window=4, config=SOLVER, mesh=mesh8,
                         memory_bytes=memory_bytes, segment_steps=50)

    roomy = run(None)
    # room for one batch of MIN_RUNS_PER_DEVICE runs of n = 14 per device: one candidate a call
    tight = run(fe.MIN_RUNS_PER_DEVICE * fe.run_bytes(14, 4, 2))
    again = run(None)
    assert roomy.tried == tight.tried == again.tried
    assert roomy.critical_n == tight.critical_n == again.critical_n
    assert roomy.steps == again.steps
