"""The samples of a WebDataset tar stream, exactly as webdataset's ``group_by_keys(tar_file_expander(...))`` yields
them, without :mod:`tarfile`'s per-member cost.

Stream-mode ``tarfile`` spends ~40 us on each member's header (a ``TarInfo`` with every field parsed, its
buffered ``_Stream``); on small images (the demo's 8x8 PNGs: two members per sample, ``.png`` and ``.cls``) that was
a quarter of a loader worker's time. :func:`tar_members` parses the headers that shard writers produce itself: a
regular file's (or a directory's, link's, device's) ustar / GNU header, optionally preceded by a pax header that
sets no path, size or sparse field (webdataset's ``TarWriter`` writes one per member for its float mtime). Such a
header is checked as ``tarfile.TarInfo.frombuf`` checks it (the checksum, every numeric field, the ustar prefix
joined to the name) and the end of the data is treated as stream-mode ``tarfile`` treats it (a member cut short
raises ``ReadError``, a header cut short ends the archive). At the first header it does not take (any other type,
a pax path or size, a global pax header, a bad checksum, the end-of-archive blocks, a compressed tar) it hands the
stream from that header on to ``tarfile`` (after a directory entry that gives ``tarfile`` the same offset-dependent
behaviour as mid-archive), so every archive, well-formed, truncated or corrupt, yields the same members and fails
with the same error after the same member as webdataset's reader (``tests/test_tar.py`` compares them).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: (key, suffix)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skip_meta
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's pax record
_PAX_CHARSET = re.compile(rb"\d+ hdrcharset=([^\n]+)\n")
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_NO_DATA = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE)
# the numeric fields frombuf parses: mode, uid, gid, size, mtime, chksum, devmajor, devminor
# tarfile's own layout of them (7 or 11 octal digits, NUL; the checksum: 6 digits, NUL, space; devices may be NULs),
# which needs no per-field parsing
_WRITTEN = re.compile(rb"[0-7]{7}\0[0-7]{7}\0[0-7]{7}\0([0-7]{11})\0[0-7]{11}\0([0-7]{6})\0 ")
_DEVICES = re.compile(rb"(?:[0-7]{7}\0|\0{8}){2}")
_BARE_TAIL = bytes(BLOCK - 345)  # the ustar prefix and padding, unused
_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
_RESUME = tarfile.TarInfo("maskray-resume")  # puts the handed-over stream at a non-zero offset (skipped: a directory)
_RESUME.type = tarfile.DIRTYPE
_RESUME_BLOCK = _RESUME.tobuf(tarfile.USTAR_FORMAT)


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """``{"__key__", "__url__", <suffix>: bytes, ...}`` per sample of the tar ``stream``: what
    ``group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))`` yields, and raises, for the same bytes
    (consecutive members grouped by the name before the first dot of its base name, suffixes lower-cased)."""
    sample = None
    for name, data in tar_members(stream):
        match = _KEY.match(name)
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None and not sample.get("__bad__", False):
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix} {sample.keys()}")
        sample[suffix] = data
    if sample is not None and not sample.get("__bad__", False):
        yield sample


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular, non-metadata members of the uncompressed or compressed tar ``stream``, as
    webdataset's ``tar_file_iterator`` yields them (see the module docstring)."""
    offset = 0  # where the next header starts
    while True:
        consumed = block = _read(stream, BLOCK)
        header = _header(block)
        if header is not None and header[0] == tarfile.XHDTYPE:  # pax records, then the member's own header
            wanted = _padded(header[2])
            pax = _read(stream, wanted)
            consumed += pax
            header = None
            if len(pax) == wanted and _harmless_pax(pax):
                block = _read(stream, BLOCK)
                consumed += block
                header = _header(block)
                if header is not None and header[0] == tarfile.XHDTYPE:
                    header = None
        if header is None or (offset == 0 and _compressed(consumed)):
            yield from _tarfile_members(stream, consumed if offset == 0 else _RESUME_BLOCK + consumed, offset == 0)
            return
        offset += len(consumed)
        kind, name, size = header
        if kind in _NO_DATA:
            continue
        padded = _padded(size)
        offset += padded
        if _metadata(name):
            if len(_read(stream, padded)) < padded:  # tarfile's next() seeks past the data first
                raise tarfile.ReadError("unexpected end of data")
            continue
        data = _read(stream, size)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data @ {stream}")  # tar_file_iterator adds the stream
        yield name, data
        if len(_read(stream, padded - size)) < padded - size:
            raise tarfile.ReadError("unexpected end of data")


def _metadata(name: str) -> bool:
    """Whether tar_file_iterator skips a member of this name (``__*__`` metadata)."""
    return "/" not in name and name.startswith("__") and name.endswith("__") or bool(_META.match(name))


def _header(block: bytes) -> tuple[bytes, str, int] | None:
    """(type, name, size) of a header block that this module reads itself (frombuf would accept it and read
    these values), else None."""
    if len(block) != BLOCK:
        return None
    written = _WRITTEN.match(block, 100)
    if written and _DEVICES.match(block, 329):
        size, checksum = int(written.group(1), 8), int(written.group(2), 8)
    else:
        numbers = [_number(block[start:end]) for start, end in _NUMBERS]
        if None in numbers:
            return None
        size, checksum = numbers[3], numbers[5]
    bare = block.endswith(_BARE_TAIL)  # no ustar prefix (the usual case): the tail adds nothing to the checksum
    if checksum != 256 + sum(block[:345] if bare else block) - sum(block[148:156]):
        return None
    kind = block[156:157]
    name = _string(block[0:100])
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE  # frombuf: an old V7 directory
    elif kind not in _REGULAR and kind not in _NO_DATA and kind != tarfile.XHDTYPE:
        return None
    prefix = "" if bare else _string(block[345:500])
    return kind, prefix + "/" + name if prefix else name, size


def _number(field: bytes) -> int | None:
    """tarfile's ``nti`` of an octal field, or None (base-256, or not plain octal: left to tarfile)."""
    if field[0] in (0o200, 0o377):
        return None
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        return None


def _string(field: bytes) -> str:
    """tarfile's ``nts`` with the stream reader's encoding."""
    return field.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _harmless_pax(records: bytes) -> bool:
    """Whether tarfile reads these pax records without error and without changing the next member's name, size
    or data (only its times, ids, owner names, link target or unused keys)."""
    if _PAX_CHARSET.search(records):  # tarfile decodes it strictly
        return False
    position = 0
    while match := _PAX_RECORD.match(records, position):
        length, keyword = int(match.group(1)), match.group(2)
        if length == 0 or keyword in (b"path", b"size") or keyword.startswith(b"GNU.sparse."):
            return False
        position += length
    return True


def _compressed(head: bytes) -> bool:
    """tarfile's stream-mode compression check (``_StreamProxy.getcomptype``) of the first block."""
    return (head.startswith(b"\x1f\x8b\x08") or (head[0:3] == b"BZh" and head[4:10] == b"1AY&SY")
            or head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")))


def _read(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes, fewer only at the end of the stream."""
    data = stream.read(size)
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _tarfile_members(stream: BinaryIO, consumed: bytes, start: bool) -> Iterator[tuple[str, bytes]]:
    """The rest of ``stream`` (``consumed`` read off it already) through ``tarfile``, as ``tar_file_iterator``:
    from the start (``start``: compression detected) or mid-archive (``consumed`` begins with the resume entry)."""
    archive = tarfile.open(fileobj=_Resumed(consumed, stream), mode="r|*" if start else "r|")
    for info in archive:
        name = info.name
        if not info.isreg() or _metadata(name):
            continue
        try:
            data = archive.extractfile(info).read()
        except Exception as exc:
            if exc.args:
                exc.args = (f"{exc.args[0]} @ {stream}",) + exc.args[1:]
            raise
        yield name, data
        archive.members = []


class _Resumed:
    """A read-only stream: ``prefix``, then the rest of ``stream``."""

    def __init__(self, prefix: bytes, stream: BinaryIO):
        self.prefix, self.stream = prefix, stream

    def read(self, size: int = -1) -> bytes:
        if not self.prefix:
            return self.stream.read(size)
        if size < 0:
            data, self.prefix = self.prefix + self.stream.read(), b""
            return data
        data, self.prefix = self.prefix[:size], self.prefix[size:]
        return data + self.stream.read(size - len(data)) if len(data) < size else data
