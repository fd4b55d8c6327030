"""maskray's tar reader yields what webdataset's does, and fails alike, on well-formed, truncated and corrupt tars."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from maskray.data.tar import tar_samples


def _webdataset(data: bytes) -> tuple[list[dict], tuple[str, str] | None]:
    stream = io.BytesIO(data)
    return _outcome(lambda: group_by_keys(tar_file_expander([{"url": "u", "stream": stream}])), stream)


def _maskray(data: bytes) -> tuple[list[dict], tuple[str, str] | None]:
    stream = io.BytesIO(data)
    return _outcome(lambda: tar_samples(stream, "u"), stream)


def _outcome(samples, stream) -> tuple[list[dict], tuple[str, str] | None]:
    """(the samples yielded, (type, first argument) of the error that ended them, the stream's name normalised)."""
    out = []
    try:
        for sample in samples():
            out.append(sample)
    except Exception as exc:  # noqa: BLE001 - the error itself is compared
        return out, (type(exc).__name__, str(exc.args[0]).replace(str(stream), "<stream>") if exc.args else "")
    return out, None


def _tar(members: list[tuple[str, bytes]], tar_format=tarfile.PAX_FORMAT, mtime: float = 0,
         extra: list[tarfile.TarInfo] = ()) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as archive:
        for info in extra:
            archive.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _samples(n: int) -> list[tuple[str, bytes]]:
    """``n`` two-member samples, sizes chosen to hit padding edges (0, 511, 512, 513 bytes)."""
    sizes = [0, 1, 511, 512, 513, 100, 1024]
    members = []
    for i in range(n):
        members += [(f"s{i:03d}.cls", str(i % 3).encode()), (f"s{i:03d}.png", bytes([i % 251]) * sizes[i % len(sizes)])]
    return members


def _webdataset_writer(n: int, **kwargs) -> bytes:
    out = io.BytesIO()
    with wds.TarWriter(out, encoder=False, **kwargs) as writer:
        for i in range(n):
            writer.write({"__key__": f"k{i:03d}", "cls": str(i).encode(), "png": bytes(range(i % 200)) * 3})
    return out.getvalue()


def _pax(records: dict[str, str]) -> bytes:
    """Samples whose fourth member (1 byte) carries pax ``records`` (a pax size shorter than the header's: tarfile reads
    the pax size)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for i, (name, data) in enumerate(_samples(4)):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), records if i == 3 else {}
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _link(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, "s000.png"
    return info


ARCHIVES = {
    "maskray writer (integer mtime)": lambda: _webdataset_writer(12, mtime=0),
    "webdataset writer (float mtime: pax per member)": lambda: _webdataset_writer(12),
    "ustar, padding edges": lambda: _tar(_samples(14), tarfile.USTAR_FORMAT),
    "ustar prefix name": lambda: _tar([("d" * 90 + "/" + "e" * 60 + "/x.cls", b"1"), ("y.cls", b"2")],
                                      tarfile.USTAR_FORMAT),
    "gnu long names": lambda: _tar(_samples(3) + [("L" * 150 + ".png", b"long"), ("z.cls", b"3")] + _samples(2),
                                   tarfile.GNU_FORMAT),
    "pax path mid-archive": lambda: _tar(_samples(3) + [("p" * 150 + ".png", b"long")] + _samples(2)),
    "pax size": lambda: _pax({"size": "0", "comment": "x"}),
    "pax hdrcharset": lambda: _pax({"hdrcharset": "BINARY", "uname": "u"}),
    "pax hdrcharset not utf-8": lambda: _pax({"hdrcharset": "BINARY"}).replace(b"=BINARY", b"=\xffINARY"),
    "pax float mtime": lambda: _tar(_samples(6), mtime=1.5),
    "directories, links, metadata": lambda: _tar(
        _samples(2) + [("__meta__", b"m"), ("a/__b__/c.png", b"x"), ("__x__/y.png", b"y")] + _samples(2),
        extra=[_directory("dir"), _link("lnk"), _directory("v7dir/")]),
    "duplicate member": lambda: _tar([("0.png", b"0"), ("a.png", b"1"), ("a.png", b"2"), ("b.png", b"3")]),
    "odd names": lambda: _tar([("plain", b"1"), ("a.png", b"2"), ("a.b.c", b"3"), ("k.PNG", b"4"), ("ab/.png", b"5"),
                               ("b.__bad__", b"6"), ("b.png", b"7"), ("c.__bad__", b""), ("d.x/e", b"8")]),
    "gzip": lambda: gzip.compress(_tar(_samples(4))),
    "empty": lambda: b"",
    "end blocks only": lambda: bytes(1024),
    "not a tar": lambda: b"not a tar file at all" * 40,
}


FAILING = {"duplicate member", "pax hdrcharset not utf-8", "empty", "not a tar"}
EMPTY = {"empty", "end blocks only", "not a tar"}


def _cuts(size: int) -> list[int]:
    """Truncation points: every block boundary and its neighbours, and a stride through the data."""
    edges = {edge + delta for edge in range(0, size + 1, 512) for delta in (-1, 0, 1)}
    return sorted(cut for cut in edges | set(range(0, size + 1, 97)) if 0 <= cut <= size)


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_same_samples_and_errors_as_webdataset_for_every_truncation(name):
    data = ARCHIVES[name]()
    whole = _maskray(data)
    assert whole == _webdataset(data)
    assert (whole[1] is not None) == (name in FAILING), whole[1]
    assert bool(whole[0]) == (name not in EMPTY)
    for cut in _cuts(len(data)):
        assert _maskray(data[:cut]) == _webdataset(data[:cut]), f"{name} cut at {cut}"


@pytest.mark.parametrize("name", ["maskray writer (integer mtime)", "webdataset writer (float mtime: pax per member)",
                                  "gnu long names"])
def test_same_samples_and_errors_as_webdataset_for_corrupt_header_bytes(name):
    data = ARCHIVES[name]()
    for position in [*range(0, 2048, 7), *range(2048, len(data), 211)]:
        for value in (0, 0x37, 0xFF):
            corrupt = bytearray(data)
            corrupt[position] = value
            assert _maskray(bytes(corrupt)) == _webdataset(bytes(corrupt)), f"{name}: byte {position} = {value}"


def test_numeric_fields_that_tarfile_parses_its_own_way_go_to_tarfile():
    data = bytearray(_tar(_samples(3), tarfile.USTAR_FORMAT))
    header = 512 * 2  # the second sample's first header
    for field, value in ((124, b" 00000001 \0"), (100, b"\x80\0\0\0\0\0\0\x01"), (124, b"0o0000001\0\0\0")):
        corrupt = bytearray(data)
        corrupt[header + field:header + field + len(value)] = value
        checksum = 256 + sum(corrupt[header:header + 148]) + sum(corrupt[header + 156:header + 512])
        corrupt[header + 148:header + 156] = b"%06o\0 " % checksum
        assert _maskray(bytes(corrupt)) == _webdataset(bytes(corrupt))
