import numpy as np
import pytest

from jaxlab import arrays


def test_array_round_trip_and_reopen(tmp_path):
    path = tmp_path / "a"
    array = arrays.open_array(path, (10, 3), "float32", 4)
    assert arrays.read_rows(array).shape == (10, 3) and not arrays.read_rows(array).any()
    block = np.arange(15, dtype=np.float32).reshape(5, 3)
    arrays.write_rows(array, 3, block)  # spans chunks 0 and 1
    again = arrays.open_array(path, (10, 3), np.float32, 4)
    np.testing.assert_array_equal(arrays.read_rows(again, 3, 8), block)
    np.testing.assert_array_equal(arrays.read_rows(again)[:3], 0)
    assert sorted(p.name for p in (path / "c").iterdir()) == ["0", "1"]  # chunk 2 never written


@pytest.mark.parametrize("shape, dtype, chunk_rows, differs", [
    ((12, 3), "float32", 4, r"shape \(10, 3\) on disk, \(12, 3\) asked for"),
    ((10, 3), "int32", 4, r"dtype float32 on disk, int32 asked for"),
    ((10, 3), "float32", 5, r"chunks \(4, 3\) on disk, \(5, 3\) asked for"),
])
def test_reopening_with_another_layout_is_refused_naming_the_path(tmp_path, shape, dtype,
                                                                  chunk_rows, differs):
    arrays.open_array(tmp_path / "a", (10, 3), "float32", 4)
    with pytest.raises(arrays.ArrayMismatch, match=str(tmp_path / "a") + ".*" + differs):
        arrays.open_array(tmp_path / "a", shape, dtype, chunk_rows)


def test_chunk_bounds_cover_the_rows_once():
    bounds = [arrays.chunk_bounds(c, 10, 4) for c in range(arrays.num_chunks(10, 4))]
    assert bounds == [(0, 4), (4, 8), (8, 10)]


def _specs(rows=10):
    return {"x": ((rows, 2), "int32"), "y": ((rows,), "float32")}


def _rows(start, stop):
    x = np.arange(start, stop, dtype=np.int32)
    return {"x": np.stack([x, -x], axis=1), "y": x.astype(np.float32) / 2}


def test_fill_resumes_computing_only_missing_chunks(tmp_path):
    calls = []

    def compute(start, stop):
        calls.append((start, stop))
        return _rows(start, stop)

    store = arrays.open_store(tmp_path / "s", _specs(), 4)
    arrays.write_chunk(store, 1, _rows(4, 8))  # an earlier run finished chunk 1 only
    assert arrays.missing_chunks(store) == [0, 2]
    assert arrays.fill(store, compute) == [0, 2]
    assert calls == [(0, 4), (8, 10)]
    reopened = arrays.open_store(tmp_path / "s", _specs(), 4)
    assert arrays.fill(reopened, compute) == [] and len(calls) == 2
    expected = _rows(0, 10)
    for name in ("x", "y"):
        np.testing.assert_array_equal(arrays.read(reopened, name), expected[name])


def test_a_chunk_without_its_flag_counts_as_missing(tmp_path):
    store = arrays.open_store(tmp_path / "s", _specs(), 4)
    for chunk in range(3):
        arrays.write_chunk(store, chunk, _rows(*arrays.chunk_bounds(chunk, 10, 4)))
    # A kill after chunk 1's data and before its flag: the data is there, the flag is not.
    arrays.write_rows(store.done, 1, np.zeros(1, np.uint8))
    assert arrays.missing_chunks(store) == [1]
    assert arrays.complete_chunks(store).tolist() == [True, False, True]
    calls = []
    arrays.fill(store, lambda start, stop: calls.append((start, stop)) or _rows(start, stop))
    assert calls == [(4, 8)] and arrays.missing_chunks(store) == []


def test_store_errors_name_the_array(tmp_path):
    store = arrays.open_store(tmp_path / "s", _specs(), 4)
    with pytest.raises(ValueError, match=r"s/x: chunk 2 \(rows 8:10\) must have shape \(2, 2\)"):
        arrays.write_chunk(store, 2, {"x": np.zeros((4, 2)), "y": np.zeros(2)})
    with pytest.raises(ValueError, match=r"needs values for \['x', 'y'\], got \['x'\]"):
        arrays.write_chunk(store, 0, {"x": np.zeros((4, 2))})
    assert arrays.missing_chunks(store) == [0, 1, 2]  # nothing flagged by a refused write
    with pytest.raises(arrays.ArrayMismatch, match=r"s/x holds another array"):
        arrays.open_store(tmp_path / "s", _specs(rows=11), 4)
    with pytest.raises(ValueError, match="share their first axis"):
        arrays.open_store(tmp_path / "t", {"x": ((3,), "int32"), "y": ((4,), "int32")}, 2)
