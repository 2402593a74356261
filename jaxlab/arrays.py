"""Large arrays on disk: zarr (v3) arrays through tensorstore, written and resumed chunk by chunk.

A *row store* is a folder of arrays that share their first axis (rows: documents, problems) and
its chunking, plus one flag per row-chunk saying the chunk is complete:

    <folder>/zarr.json           a zarr v3 group, so zarr readers see the arrays as its members
    <folder>/<name>/             a zarr3 array [rows, ...] in chunks [chunk_rows, ...] (whole
                                 along every other axis: one file per chunk, zstd-compressed)
    <folder>/done/               uint8 [num_chunks] in chunks of 1: 1 once chunk c is complete
                                 in every array of the store

Chunk c holds rows [c * chunk_rows, min((c + 1) * chunk_rows, rows)). A chunk is written by
`write_chunk`: first its data in every array (waiting until tensorstore has committed it), then
its flag. What a kill leaves behind:
- killed while the data is written: no flag, so the chunk counts as missing and a rerun writes
  it again in full (tensorstore's file kvstore also replaces a chunk file through a lock file that
  is renamed into place, so a file is old or new, never torn; the flag makes this not matter);
- killed after the data, before the flag: the chunk is recomputed once more (wasted work, not
  wrong data);
- the flag is a one-byte chunk file of its own, so setting it cannot damage another chunk's flag.
A chunk never written reads as zeros (the fill value). `fill` computes only the missing chunks.

Arrays elsewhere in the library go through `open_array`, `write_rows` and `read_rows`. Reopening
an array with another shape, dtype or chunking is refused with an `ArrayMismatch` naming the
path and what differs: mixing two layouts would silently misplace rows.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from jaxlab import results

_GROUP = '{"zarr_format": 3, "node_type": "group", "attributes": {}}\n'
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}},
           {"name": "zstd", "configuration": {"level": 3}}]


class ArrayMismatch(ValueError):
    """An array on disk whose shape, dtype or chunking differs from what was asked for."""


class RowStore(NamedTuple):
    """Open arrays of one folder, sharing rows and chunk_rows (see the module docstring)."""

    folder: pathlib.Path
    arrays: dict[str, ts.TensorStore]   # name -> [rows, ...]
    done: ts.TensorStore                # uint8 [num_chunks]
    rows: int
    chunk_rows: int


def num_chunks(rows: int, chunk_rows: int) -> int:
    """ceil(rows / chunk_rows): how many row-chunks cover `rows` rows."""
    return -(-rows // chunk_rows)


def chunk_bounds(chunk: int, rows: int, chunk_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of `chunk`: start = chunk * chunk_rows, stop = min(start +
    chunk_rows, rows)."""
    start = chunk * chunk_rows
    return start, min(start + chunk_rows, rows)


def open_array(path: str | pathlib.Path, shape: Sequence[int], dtype: str | np.dtype,
               chunk_rows: int) -> ts.TensorStore:
    """The zarr3 array at `path` [shape], in chunks [chunk_rows, *shape[1:]], created (zeros)
    when there is none; ArrayMismatch naming the path and the difference when the one there has
    another shape, dtype or chunk shape."""
    path = pathlib.Path(path)
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    if not shape or chunk_rows < 1 or min(shape) < 0:
        raise ValueError(f"{path}: need a shape with a first axis and chunk_rows >= 1, got "
                         f"shape {shape}, chunk_rows {chunk_rows}")
    chunks = (chunk_rows, *shape[1:])
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}

    def create():
        if not (path / "zarr.json").is_file():
            ts.open({**spec, "metadata": {"codecs": _CODECS}}, create=True,
                    dtype=ts.dtype(dtype), shape=shape,
                    chunk_layout=ts.ChunkLayout(chunk_shape=chunks)).result()

    results.write_once(create, path)  # by process 0 of a multi-process run
    array = ts.open(spec, open=True).result()
    found = {"shape": tuple(array.shape), "dtype": array.dtype.numpy_dtype,
             "chunks": tuple(array.chunk_layout.write_chunk.shape)}
    wanted = {"shape": shape, "dtype": dtype, "chunks": chunks}
    differ = [f"{k} {found[k]} on disk, {wanted[k]} asked for" for k in wanted
              if found[k] != wanted[k]]
    if differ:
        raise ArrayMismatch(f"{path} holds another array ({'; '.join(differ)}); delete it to "
                            f"start over or write elsewhere")
    return array


def write_rows(array: ts.TensorStore, start: int, values: np.ndarray) -> None:
    """array[start:start + len(values)] = values, returning once the write is committed."""
    array[start:start + len(values)].write(np.asarray(values)).result()


def read_rows(array: ts.TensorStore, start: int = 0, stop: int | None = None) -> np.ndarray:
    """array[start:stop] as NumPy [stop - start, ...] (stop None: to the end)."""
    return array[start:array.shape[0] if stop is None else stop].read().result()


def open_store(folder: str | pathlib.Path, specs: Mapping[str, tuple[Sequence[int], str]],
               chunk_rows: int) -> RowStore:
    """The row store in `folder` with arrays {name: (shape, dtype)}, every shape [rows, ...]
    with the same rows; created where missing, ArrayMismatch where one differs."""
    folder = pathlib.Path(folder)
    rows = {int(shape[0]) for shape, _ in specs.values()}
    if len(rows) != 1 or "done" in specs:
        raise ValueError(f"{folder}: arrays must share their first axis and not be named "
                         f"'done', got { {k: tuple(s) for k, (s, _) in specs.items()} }")
    (rows,) = rows

    results.write_text(folder / "zarr.json", _GROUP)  # the same every time: written anew
    arrays = {name: open_array(folder / name, shape, dtype, chunk_rows)
              for name, (shape, dtype) in specs.items()}
    done = open_array(folder / "done", (num_chunks(rows, chunk_rows),), "uint8", 1)
    return RowStore(folder, arrays, done, rows, chunk_rows)


def complete_chunks(store: RowStore) -> np.ndarray:
    """bool [num_chunks]: whether each chunk's flag is set."""
    return read_rows(store.done) == 1


def missing_chunks(store: RowStore) -> list[int]:
    """The chunks whose flag is not set, in order."""
    return np.flatnonzero(~complete_chunks(store)).tolist()


def write_chunk(store: RowStore, chunk: int, values: Mapping[str, np.ndarray]) -> None:
    """Writes chunk `chunk` of every array ({name: [stop - start, ...]}, every name of the
    store), waits until the data is committed, then sets the chunk's flag."""
    start, stop = chunk_bounds(chunk, store.rows, store.chunk_rows)
    if set(values) != set(store.arrays):
        raise ValueError(f"{store.folder}: chunk {chunk} needs values for "
                         f"{sorted(store.arrays)}, got {sorted(values)}")
    values = {name: np.asarray(value) for name, value in values.items()}
    for name, value in values.items():
        expected = (stop - start, *store.arrays[name].shape[1:])
        if value.shape != expected:
            raise ValueError(f"{store.folder / name}: chunk {chunk} (rows {start}:{stop}) must "
                             f"have shape {expected}, got {value.shape}")

    def write():
        pending = [store.arrays[name][start:stop].write(value)
                   for name, value in values.items()]
        for future in pending:
            future.result()
        write_rows(store.done, chunk, np.ones(1, np.uint8))

    results.write_once(write, f"{store.folder} chunk {chunk}")


def fill(store: RowStore, compute: Callable[[int, int], Mapping[str, np.ndarray]],
         progress: str | None = None) -> list[int]:
    """Computes and writes every missing chunk: `compute(start, stop)` gives the chunk's rows
    {name: [stop - start, ...]}; complete chunks are not computed again. Returns the chunks
    computed (progress: a bar label, counting rows)."""
    missing = missing_chunks(store)
    results.wait_for_all(f"read {store.folder}")  # before process 0 writes a chunk
    bounds = [chunk_bounds(c, store.rows, store.chunk_rows) for c in missing]
    with tqdm(total=sum(stop - start for start, stop in bounds), desc=progress, unit="row",
              disable=progress is None or not missing, dynamic_ncols=True) as bar:
        for chunk, (start, stop) in zip(missing, bounds, strict=True):
            write_chunk(store, chunk, compute(start, stop))
            bar.update(stop - start)
    return missing


def read(store: RowStore, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of the store's array `name` as NumPy."""
    return read_rows(store.arrays[name], start, stop)
