"""Read and rename the soname of a 64-bit little-endian ELF shared library (x86-64 Linux, where the
oneDNN wheels exist), in place of patchelf.

Why: the dynamic loader hands a library that needs `libdnnl.so.3` whatever object of that soname
the process already loaded; MindSpore 2.10 bundles its own libdnnl.so.3 (oneDNN 3.10), so our
kernels, built against oneDNN 3.2, would run on it. A copy whose soname no other oneDNN has cannot
be mistaken for another (onednn_conv.private_library). The new name has the old one's length, so
the string table is rewritten in place and nothing else in the file moves.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_STRTAB, DT_SONAME = 0, 5, 14


class NotALibrary(ValueError):
    """Not an ELF64 little-endian shared library with a soname."""


def _mapped(f, access) -> mmap.mmap:
    try:
        return mmap.mmap(f.fileno(), 0, access=access)
    except ValueError:  # an empty file
        raise NotALibrary("not a 64-bit little-endian ELF file") from None


def _soname_offset(data) -> int:
    """File offset of the soname string: DT_SONAME (an offset into DT_STRTAB, an address mapped by a
    PT_LOAD segment) from the PT_DYNAMIC segment."""
    try:
        return _find_soname(data)
    except (struct.error, IndexError):  # offsets past the end: a truncated file
        raise NotALibrary("truncated ELF file") from None


def _find_soname(data) -> int:
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NotALibrary("not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        kind, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if kind == PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif kind == PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        raise NotALibrary("no dynamic section")
    tags = {}
    for at in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == DT_NULL:
            break
        tags.setdefault(tag, value)
    if DT_SONAME not in tags or DT_STRTAB not in tags:
        raise NotALibrary("no soname")
    strtab = next((off + tags[DT_STRTAB] - va for va, off, size in loads if va <= tags[DT_STRTAB] < va + size), None)
    if strtab is None:
        raise NotALibrary("string table outside the file's segments")
    return strtab + tags[DT_SONAME]


def soname(path: Path) -> str:
    with open(path, "rb") as f, _mapped(f, mmap.ACCESS_READ) as data:
        at = _soname_offset(data)
        return data[at:data.find(b"\0", at)].decode()


def rename(path: Path, new: str) -> None:
    """Give the library at `path` the soname `new` (as long as its soname), in place: a page or two
    of the file are read and one string written (the library is ~50 MB)."""
    with open(path, "r+b") as f, _mapped(f, mmap.ACCESS_WRITE) as data:
        at = _soname_offset(data)
        old = data[at:data.find(b"\0", at)]
        if len(new.encode()) != len(old):
            raise NotALibrary(f"soname {new!r} is not as long as {old.decode()!r}")
        data[at:at + len(old)] = new.encode()
