"""Mutations of a good file's bytes for fuzzing (test_fuzz.py, test_raw.py): overwrite bytes, cut, insert, or zero a
run. A mutation is a plain tuple, so a failure prints it and ``mutate`` rebuilds the file from it by hand."""

from __future__ import annotations

from hypothesis import strategies as st

mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=12)),
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("zero"), st.tuples(st.floats(0, 1), st.integers(1, 512))),
)


def mutate(data: bytes, how: tuple) -> bytes:  # type: ignore[type-arg]
    kind, arg = how
    buf = bytearray(data)
    if kind == "flip":
        for where, value in arg:
            buf[min(len(buf) - 1, int(where * len(buf)))] = value
    elif kind == "cut":
        del buf[int(arg * len(buf)) :]
    elif kind == "insert":
        where, chunk = arg
        buf[int(where * len(buf)) : int(where * len(buf))] = chunk
    else:
        where, n = arg
        start = int(where * len(buf))
        buf[start : start + n] = bytes(len(buf[start : start + n]))
    return bytes(buf)
