"""Tests for pipeline/safe_pickle.py: plain data loads, anything that needs a global is refused unrun."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest

from pipeline import safe_pickle
from pipeline.errors import UserError
from pipeline.safe_pickle import safe_load


class _Evil:
    """A payload that would create a sentinel file if any unpickler ran it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


PLAIN = {
    "vid1": [["a", "man", "sings"], ["a", "man", "is", "singing"]],
    "vïd 2": ["ein Mann singt", "一个男人在唱歌"],
    "numbers": (1, 2.5, -3, True, None),
    "nested": {"k": [[], {}, ()]},
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_loads_with_every_protocol(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(PLAIN, protocol=protocol))
    assert safe_load(path) == PLAIN


def test_sets_and_bytes_load_with_modern_protocols(tmp_path: Path) -> None:
    # Protocols 0-2 encode bytes and sets through globals (_codecs.encode, builtins.set); 4+ does not.
    data = {"ids": {"a", "b"}, "frozen": frozenset({1}), "raw": b"\x00\xff"}
    path = tmp_path / "modern.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    assert safe_load(path) == data


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reduce_payload_is_refused_and_never_runs(tmp_path: Path, protocol: int) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"vid": _Evil(sentinel)}, protocol=protocol))
    with pytest.raises(UserError) as err:
        safe_load(path)
    message = str(err.value)
    assert str(path) in message
    assert "refused to unpickle" in message and "system'" in message
    assert "only plain dicts, lists and strings are allowed" in message
    assert "\n" not in message
    assert not sentinel.exists()


def test_handwritten_global_opcode_is_refused(tmp_path: Path) -> None:
    # Protocol 0 text: GLOBAL builtins.eval, then REDUCE on a tuple holding the code string.
    sentinel = tmp_path / "SENTINEL"
    code = f"open({str(sentinel)!r}, 'w').close()"
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cbuiltins\neval\n(V" + code.encode() + b"\ntR.")
    with pytest.raises(UserError, match=r"refused to unpickle 'builtins\.eval'"):
        safe_load(path)
    assert not sentinel.exists()


def test_object_instances_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps(Path("x")))
    with pytest.raises(UserError, match="refused to unpickle 'pathlib"):
        safe_load(path)


def test_truncated_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(PLAIN)[:20])
    with pytest.raises(UserError, match="not a valid pickle") as err:
        safe_load(path)
    assert str(path) in str(err.value)


def test_text_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pkl"
    path.write_text("these are not pickled captions\n")
    with pytest.raises(UserError, match="not a valid pickle"):
        safe_load(path)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        safe_load(tmp_path / "absent.pkl")


HUGE = struct.pack("<Q", 2**62)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x80\x04\x8d" + HUGE + b"x.", id="BINUNICODE8"),
        pytest.param(b"\x80\x04\x8e" + HUGE + b"x.", id="BINBYTES8"),
        pytest.param(b"\x80\x05\x96" + HUGE + b"x.", id="BYTEARRAY8"),
        pytest.param(b"\x80\x04\x95" + HUGE + b"N.", id="FRAME"),
        pytest.param(b"\x80\x04\x95" + struct.pack("<Q", 2**64 - 1) + b"N.", id="FRAME-max"),
        pytest.param(b"F1e999\n.", id="FLOAT-overflow"),
    ],
)
def test_corrupt_length_or_number_is_a_user_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "corrupt.pkl"
    path.write_bytes(data)
    with pytest.raises(UserError, match="not a valid pickle") as err:
        safe_load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_file_above_the_size_limit_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(PLAIN))
    monkeypatch.setattr(safe_pickle, "MAX_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(safe_pickle, "_PlainDataUnpickler", None)  # unpickling would fail loudly
    with pytest.raises(UserError, match="MiB an annotation pickle may hold") as err:
        safe_load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
