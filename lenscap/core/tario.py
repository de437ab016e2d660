"""Tar reading and writing at the speed of the bytes: the image tars of every dataset that holds images.

``tarfile`` spends about 30 us of Python per member header, which at three members per sample is
the whole cost of an export. Here a header is parsed or built with a few slices, and image bytes go
from the input tar to the output tar by ``os.copy_file_range`` (in the kernel, no copy through
Python) where the system has it. The output is plain POSIX ustar, as ``tarfile`` writes it; member
names longer than 100 bytes are refused (keys are short digits).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import IO, BinaryIO

__all__ = ["scan_members", "member_name", "header_before", "archive_end", "TarOut", "BLOCK"]

BLOCK = 512
_RECORD = 20 * BLOCK  # tarfile pads archives to whole records; so do we, for the same file sizes
_ZERO = bytes(BLOCK)


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large sizes
        raise ValueError("base-256 number")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def scan_members(source: Path | IO[bytes], suffix: str) -> dict[str, tuple[int, int]]:
    """``{key: (data offset, size)}`` of the members named ``KEY.<suffix>``, from the headers alone.
    ``source`` is a path or a seekable binary file (a remote tar, read by ranges).
    Falls back to ``tarfile`` for anything but plain ustar/pax regular files."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return scan_members(f, suffix)
    out: dict[str, tuple[int, int]] = {}
    f = source
    try:
        offset, long_name = 0, None
        while True:
            f.seek(offset)
            header = f.read(BLOCK)
            if len(header) < BLOCK or header == _ZERO:
                return out
            size, kind = _octal(header[124:136]), header[156:157]
            data = offset + BLOCK
            if kind in (b"x", b"L"):  # pax extended header or GNU long name: applies to the next member
                payload = f.read(size)
                long_name = _pax_path(payload) if kind == b"x" else payload.rstrip(b"\0").decode()
            elif kind in (b"0", b"\0", b"7"):
                name = long_name or _ustar_name(header)
                long_name = None
                key, _, ext = name.partition(".")
                if ext == suffix:
                    out[key] = (data, size)
            elif kind != b"g":
                long_name = None
            offset = data + -(-size // BLOCK) * BLOCK
    except ValueError:
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            return {m.name.partition(".")[0]: (m.offset_data, m.size) for m in tar if m.name.partition(".")[2] == suffix}


def archive_end(f: BinaryIO) -> int:
    """Where the archive's end-of-archive blocks (or the file) begin: where a member appended goes."""
    offset = 0
    while True:
        f.seek(offset)
        header = f.read(BLOCK)
        if len(header) < BLOCK or header == _ZERO:
            return offset
        offset += BLOCK + -(-_octal(header[124:136]) // BLOCK) * BLOCK


def member_name(header: bytes) -> str | None:
    """The name in a member's 512-byte header, or None if ``header`` is not one (a checksum that does not add up)."""
    if len(header) != BLOCK or header == _ZERO:
        return None
    try:
        checksum = _octal(header[148:156])
    except ValueError:
        return None
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        return None
    return _ustar_name(header)


def header_before(src: BinaryIO, offset: int) -> bytes:
    """The 512 bytes before ``offset``: the header of the member whose data starts there."""
    try:
        return os.pread(src.fileno(), BLOCK, offset - BLOCK)
    except (AttributeError, OSError, ValueError):  # not a local file (fsspec's has no fileno): a ranged read
        src.seek(offset - BLOCK)
        return src.read(BLOCK)


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_path(payload: bytes) -> str | None:
    for record in payload.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode()
    return None


_MODE_IDS = b"0000644\0" + b"0000000\0" + b"0000000\0"  # mode, uid, gid
_MTIME = b"00000000000\0"  # mtime 0: the same input gives the same bytes
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(247)  # type, link name, magic and version, the rest empty
# The checksum is the byte sum of the header with its own field as eight spaces: the constant part once.
_CONSTANT_SUM = sum(_MODE_IDS) + sum(_MTIME) + 8 * 32 + sum(_TAIL)


def _header(name: str, size: int) -> bytes:
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size_field = b"%011o\0" % size
    checksum = _CONSTANT_SUM + sum(raw) + sum(size_field)
    return raw.ljust(100, b"\0") + _MODE_IDS + size_field + _MTIME + b"%06o\0 " % checksum + _TAIL


class TarOut:
    """An ustar archive written member by member; ``start``: after that many bytes already in the file
    (an archive's members, from ``archive_end``), which stay as they are."""

    def __init__(self, path: Path, start: int = 0) -> None:
        self._f = open(path, "r+b" if start else "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        if start:
            self._f.seek(start)
            self._f.truncate()
        self._pos = start

    def add(self, name: str, data: bytes) -> int:
        """Add a member; returns where its data starts in the archive."""
        start = self._pos + BLOCK
        self._f.write(_header(name, len(data)))
        self._f.write(data)
        self._pad(len(data))
        return start

    def add_from(self, name: str, src: BinaryIO, offset: int, size: int) -> None:
        """A member whose bytes are ``size`` bytes of ``src`` at ``offset``, copied in the kernel."""
        self._f.write(_header(name, size))
        self._f.flush()
        out_fd, copied = self._f.fileno(), 0
        try:
            in_fd = src.fileno()  # a remote input (an fsspec file) has none: copied through memory below
            while copied < size:
                n = os.copy_file_range(in_fd, out_fd, size - copied, offset + copied)
                if n == 0:
                    raise OSError("copy_file_range copied nothing")
                copied += n
        except (AttributeError, OSError):  # no copy_file_range here (or across these filesystems)
            os.lseek(out_fd, 0, os.SEEK_END)
            src.seek(offset + copied)
            self._f.write(src.read(size - copied))
        self._f.seek(0, os.SEEK_END)
        self._pad(size)

    def _pad(self, size: int) -> None:
        self._pos += BLOCK + size
        if size % BLOCK:
            self._f.write(_ZERO[: BLOCK - size % BLOCK])
            self._pos += BLOCK - size % BLOCK

    def close(self) -> None:
        end = self._pos + 2 * BLOCK
        self._f.write(bytes(2 * BLOCK + (-end % _RECORD)))
        self._f.close()
