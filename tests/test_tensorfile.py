"""Safetensors headers: every malformed one refused in one line; valid files read as safetensors reads them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nirvana.tensorfile import (
    MAX_HEADER_BYTES,
    TensorInfo,
    check_folder,
    check_tensors,
    read_config,
    read_header,
)

A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}  # 24 bytes
B = {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}  # 8 bytes


def raw_file(path: Path, header: bytes, data: bytes, length: int | None = None) -> Path:
    """A file of an 8-byte little-endian header length (``length``, else the header's), the header, the data."""
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def header_file(path: Path, entries: dict, data_size: int) -> Path:
    return raw_file(
        path, json.dumps(entries).encode(), bytes(range(256)) * (data_size // 256) + b"\1" * (data_size % 256)
    )


def valid(path: Path) -> Path:
    return header_file(path, {"__metadata__": {"format": "pt"}, "a": A, "b": B}, 32)


def truncated(path: Path) -> Path:
    data = valid(path).read_bytes()
    path.write_bytes(data[: len(data) - 5])
    return path


# name -> (how to write the file, what the message says, whether safetensors itself refuses it too)
MALFORMED = {
    "empty-file": (lambda p: (p.write_bytes(b""), p)[1], "the file is empty", True),
    "shorter-than-length": (lambda p: (p.write_bytes(b"\x10\0\0"), p)[1], "fewer than the 8-byte header length", True),
    "huge-header-length": (lambda p: raw_file(p, b"{}", b"", length=1 << 60), "over the 100000000-byte limit", True),
    "header-over-cap": (lambda p: raw_file(p, b"{}", b"", length=MAX_HEADER_BYTES + 1), "byte limit", True),
    "header-past-end": (lambda p: raw_file(p, b"{}", b"", length=4096), "runs past the end of the 10-byte file", True),
    "truncated-data": (truncated, "run past the end of the", True),
    "offsets-out-of-range": (
        lambda p: header_file(p, {"a": A, "b": {**B, "data_offsets": [24, 40]}}, 32),
        "run past the end of the 32 data bytes",
        True,
    ),
    "reversed-offsets": (
        lambda p: header_file(p, {"a": {**A, "data_offsets": [24, 0]}, "b": {**B, "data_offsets": [24, 32]}}, 32),
        "data_offsets [24, 0] are reversed",
        True,
    ),
    "overlapping-offsets": (
        lambda p: header_file(p, {"a": A, "b": {**B, "data_offsets": [16, 24]}}, 24),
        "overlap those of 'a'",
        True,
    ),
    "gap-between-tensors": (
        lambda p: header_file(p, {"a": A, "b": {**B, "data_offsets": [28, 36]}}, 36),
        "leave bytes [24, 28) unused",
        True,
    ),
    "size-mismatch": (
        lambda p: header_file(p, {"a": {**A, "data_offsets": [0, 20]}, "b": {**B, "data_offsets": [20, 28]}}, 28),
        "needs 24 bytes, but data_offsets span 20",
        True,
    ),
    "trailing-bytes": (lambda p: header_file(p, {"a": A, "b": B}, 40), "cover 32 of the 40 data bytes", True),
    "bad-dtype": (lambda p: header_file(p, {"a": {**A, "dtype": "F33"}, "b": B}, 32), "unknown dtype 'F33'", True),
    "negative-shape": (lambda p: header_file(p, {"a": {**A, "shape": [-2, -3]}, "b": B}, 32), "shape [-2, -3]", True),
    "float-shape": (lambda p: header_file(p, {"a": {**A, "shape": [2.0, 3]}, "b": B}, 32), "shape [2.0, 3]", True),
    "bool-shape": (lambda p: header_file(p, {"a": {**A, "shape": [True, 24]}, "b": B}, 32), "shape [True, 24]", True),
    "one-offset": (lambda p: header_file(p, {"a": {**A, "data_offsets": [0]}, "b": B}, 32), "data_offsets [0]", True),
    "entry-not-object": (lambda p: header_file(p, {"a": [1, 2], "b": B}, 32), "instead of dtype, shape", True),
    "missing-dtype": (
        lambda p: header_file(p, {"a": {"shape": [2, 3], "data_offsets": [0, 24]}, "b": B}, 32),
        "unknown dtype None",
        True,
    ),
    "subbyte-partial": (
        lambda p: header_file(p, {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2),
        "does not fill whole bytes",
        True,
    ),
    "non-json-header": (lambda p: raw_file(p, b"{not json at all", b""), "its header is not JSON", True),
    "non-utf8-header": (lambda p: raw_file(p, b'{"\xff\xfe": 1}', b""), "its header is not UTF-8", True),
    "header-not-object": (lambda p: raw_file(p, b"[1, 2, 3]", b""), "JSON list, not an object", True),
    "metadata-not-strings": (
        lambda p: header_file(p, {"__metadata__": {"format": 1}, "a": A, "b": B}, 32),
        "__metadata__ is {'format': 1}",
        True,
    ),
    # The library lets the second entry win; two readers could then disagree on what the tensor is.
    "duplicate-name": (
        lambda p: raw_file(p, b'{"a": %s, "a": %s}' % (json.dumps(A).encode(), json.dumps(A).encode()), b"\0" * 24),
        "names 'a' twice",
        False,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_header_is_one_line_naming_the_file(case, tmp_path):
    write, why, library_refuses = MALFORMED[case]
    path = write(tmp_path / "model.safetensors")
    before = path.read_bytes()
    with pytest.raises(ValueError) as info:
        read_header(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"model: {str(path)!r} is not a valid safetensors file ("), message
    assert why in message, message
    assert path.read_bytes() == before
    if library_refuses:  # the same files the library refuses, so nothing it would refuse is let through
        with pytest.raises(SafetensorError), safe_open(path, framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)


def test_label_starts_the_message(tmp_path):
    path = raw_file(tmp_path / "x.safetensors", b"{oops", b"")
    with pytest.raises(ValueError, match=r"^path: .*x\.safetensors"):
        read_header(path, label="path")


def test_hand_written_valid_file_reads_like_the_library(tmp_path):
    path = valid(tmp_path / "model.safetensors")
    got = read_header(path)
    assert got == {"a": TensorInfo("F32", (2, 3), (0, 24)), "b": TensorInfo("BF16", (4,), (24, 32))}
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(got)
        assert tuple(f.get_tensor("a").shape) == (2, 3)


TENSORS = {
    "f32": torch.randn(3, 5),
    "bf16": torch.randn(7).to(torch.bfloat16),
    "f16-3d": torch.randn(2, 1, 4).to(torch.float16),
    "i64": torch.arange(6, dtype=torch.int64),
    "u8": torch.arange(5, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(1.5),
    "empty": torch.zeros(0, 4),
    "f64": torch.randn(2, dtype=torch.float64),
}


def test_round_trip_equals_safetensors_reading(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt", "note": "x"})
    got = read_header(path)
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(got)
        for name in f.keys():
            view = f.get_slice(name)
            assert got[name].dtype == view.get_dtype(), name
            assert list(got[name].shape) == list(view.get_shape()), name
            tensor = f.get_tensor(name)
            assert got[name].nbytes == tensor.numel() * tensor.element_size(), name


def test_an_empty_checkpoint_is_a_valid_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({}, path, metadata={"format": "pt"})
    assert read_header(path) == {}


def _sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, folder / "one.safetensors")
    save_file({"c": torch.zeros(4)}, folder / "two.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "one.safetensors", "b": "one.safetensors", "c": "two.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_check_folder_reads_every_shard(tmp_path):
    folder = _sharded(tmp_path)
    got = check_folder(folder)
    assert {name: (path.name, info.shape) for name, (path, info) in got.items()} == {
        "a": ("one.safetensors", (2,)),
        "b": ("one.safetensors", (3,)),
        "c": ("two.safetensors", (4,)),
    }


def _edit_index(folder: Path, change) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


INDEX_FAULTS = {
    "wrong-shard": (
        lambda m: m.update(a="two.safetensors"),
        "puts tensor 'a' in 'two.safetensors', but it is in 'one.safetensors'",
    ),
    "every-entry-of-a-shard-moved": (
        lambda m: m.update(c="one.safetensors"),
        "'one.safetensors', whose header lacks it",
    ),
    "tensor-missing-from-index": (lambda m: m.pop("b"), "tensor 'b' of"),
    "tensor-missing-from-header": (lambda m: m.update(d="two.safetensors"), "whose header lacks it"),
    "parent-path": (lambda m: m.update(c="../two.safetensors"), "outside the model folder"),
    "absolute-path": (lambda m: m.update(c="/etc/passwd"), "outside the model folder"),
    "missing-shard": (lambda m: m.update(c="three.safetensors"), "which is not a file in"),
    "non-string-shard": (lambda m: m.update(c=3), "names a shard 3"),
}


@pytest.mark.parametrize("case", list(INDEX_FAULTS), ids=list(INDEX_FAULTS))
def test_check_folder_refuses_an_index_that_disagrees(case, tmp_path):
    change, why = INDEX_FAULTS[case]
    folder = _sharded(tmp_path)
    _edit_index(folder, change)
    with pytest.raises(ValueError) as info:
        check_folder(folder)
    assert why in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b"{not json", "is not JSON"),
        (b"\xff\xfe{}", "is not UTF-8"),
        (b"[]", "no weight_map"),
        (b'{"weight_map": 1}', "no weight_map"),
    ],
    ids=["not-json", "not-utf8", "list", "map-not-object"],
)
def test_check_folder_refuses_a_corrupt_index(text, why, tmp_path):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_bytes(text)
    with pytest.raises(ValueError, match=why):
        check_folder(folder)


def test_check_folder_reads_a_linked_shard_as_a_cache_snapshot_has_them(tmp_path):
    """A Hugging Face cache snapshot links each shard into ../../blobs: read, and checked like any other."""
    folder = _sharded(tmp_path)
    want = check_folder(folder)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (folder / "two.safetensors").rename(blobs / "f00d")
    (folder / "two.safetensors").symlink_to(Path("..") / "blobs" / "f00d")
    got = check_folder(folder)
    assert {n: i for n, (_, i) in got.items()} == {n: i for n, (_, i) in want.items()}
    (blobs / "f00d").write_bytes(b"\x00" * 3)  # the link now leads to a broken file: refused by name
    with pytest.raises(ValueError, match="two.safetensors"):
        check_folder(folder)


def test_check_folder_refuses_a_tensor_in_two_shards(tmp_path):
    folder = _sharded(tmp_path)
    save_file({"c": torch.zeros(4), "a": torch.zeros(2)}, folder / "two.safetensors")
    with pytest.raises(
        ValueError, match=r"tensor 'a' is in two shards of .*sharded', 'one.safetensors' and 'two.safetensors'"
    ):
        check_folder(folder)


def test_check_folder_without_weights(tmp_path):
    with pytest.raises(ValueError, match="holds neither model.safetensors nor"):
        check_folder(tmp_path)


def _found(**shapes):
    return {name: (Path("/m/model.safetensors"), TensorInfo("F32", shape, (0, 0))) for name, shape in shapes.items()}


TENSOR_FAULTS = {
    "missing": (_found(w=(2, 3)), {}, "has no tensor 'n', which the model needs"),
    "wrong-shape": (
        _found(w=(2, 3), n=(4,)),
        {},
        "tensor 'n' in '/m/model.safetensors' has shape [4], but the model has [3]",
    ),
    "unexpected": (
        _found(w=(2, 3), n=(3,), x=(1,)),
        {},
        "tensor 'x' in '/m/model.safetensors' is not one the model has",
    ),
}


@pytest.mark.parametrize("case", list(TENSOR_FAULTS), ids=list(TENSOR_FAULTS))
def test_check_tensors_refuses(case):
    found, kw, why = TENSOR_FAULTS[case]
    with pytest.raises(ValueError) as info:
        check_tensors([{"w": (2, 3)}, {"n": (3,)}], found, folder="/m", what="the model", **kw)
    assert why in str(info.value), str(info.value)


def test_check_tensors_accepts_one_name_of_a_tied_group_and_a_missing_prefix():
    expected = [{"model.embed": (5, 2), "lm_head": (5, 2)}, {"model.norm": (2,)}]
    check_tensors(expected, _found(**{"model.embed": (5, 2), "model.norm": (2,)}), folder="/m", what="m")
    found = _found(embed=(5, 2), norm=(2,), extra=(1,))
    check_tensors(expected, found, folder="/m", what="m", allow_unexpected=True, optional_prefix="model.")
    with pytest.raises(ValueError, match="not one m has"):
        check_tensors(expected, found, folder="/m", what="m", optional_prefix="model.")


@pytest.mark.parametrize(
    ("text", "why"),
    [(b"\xff\xfe{}", "is not UTF-8 text"), (b"{oops", "is not JSON"), (b"[1]", "holds a JSON list")],
    ids=["not-utf8", "not-json", "not-object"],
)
def test_read_config_names_the_file(text, why, tmp_path):
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(ValueError) as info:
        read_config(tmp_path)
    assert why in str(info.value) and str(tmp_path / "config.json") in str(info.value)
