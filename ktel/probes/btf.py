"""Member offsets of kernel structs, from the running kernel's BTF.

BCC compiles a probe against whatever kernel headers the host has (Debian's
6.1 ones here, whatever the running kernel), so ``task->fs`` in a probe's
source would read the offset of those headers, not of the running kernel, and
BCC 0.26 applies no CO-RE relocations to the programs it loads. A probe that
must follow kernel pointers outside a tracepoint's own fields gets their
offsets from /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF, on in Debian
since 11) instead, as -D flags, and reads with bpf_probe_read_kernel().

Only what that needs is parsed: the type section (include/uapi/linux/btf.h),
struct and union members, looked through anonymous members.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic version flags hdr_len type_off type_len str_off str_len
_TYPE = struct.Struct("<III")  # name_off info size_or_type
_MEMBER = struct.Struct("<III")  # name_off type offset
# BTF_KIND_* -> bytes that follow struct btf_type, as a function of vlen.
_STRUCT, _UNION = 4, 5
_TRAILER = {
    1: lambda v: 4,  # INT
    2: lambda v: 0,  # PTR
    3: lambda v: 12,  # ARRAY
    4: lambda v: 12 * v,  # STRUCT
    5: lambda v: 12 * v,  # UNION
    6: lambda v: 8 * v,  # ENUM
    7: lambda v: 0,  # FWD
    8: lambda v: 0,  # TYPEDEF
    9: lambda v: 0,  # VOLATILE
    10: lambda v: 0,  # CONST
    11: lambda v: 0,  # RESTRICT
    12: lambda v: 0,  # FUNC
    13: lambda v: 8 * v,  # FUNC_PROTO
    14: lambda v: 4,  # VAR
    15: lambda v: 12 * v,  # DATASEC
    16: lambda v: 0,  # FLOAT
    17: lambda v: 4,  # DECL_TAG
    18: lambda v: 0,  # TYPE_TAG
    19: lambda v: 12 * v,  # ENUM64
}


class BTFError(Exception):
    pass


class BTF:
    """The structs and unions of one BTF blob (without a base: vmlinux's own)."""

    def __init__(self, data: bytes):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise BTFError(f"not little-endian BTF (magic {magic:#x})")
        types = hdr_len + type_off
        strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._strings = strings
        # id -> (kind, name_off, offset of its members in data, vlen, kind_flag); id 0 is void.
        self._types: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
        self._by_name: dict[bytes, int] = {}
        self._data = data
        pos, end = types, types + type_len
        unpack = _TYPE.unpack_from
        while pos < end:
            name_off, info, _size = unpack(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            trailer = _TRAILER.get(kind)
            if trailer is None:
                raise BTFError(f"unknown BTF kind {kind} at byte {pos}")
            pos += _TYPE.size
            self._types.append((kind, name_off, pos, vlen, info >> 31))
            if kind in (_STRUCT, _UNION) and name_off:
                self._by_name.setdefault(self._name(name_off), len(self._types) - 1)
            pos += trailer(vlen)

    def _name(self, off: int) -> bytes:
        return self._strings[off : self._strings.index(b"\0", off)]

    def _members(self, type_id: int):
        kind, _name, pos, vlen, kflag = self._types[type_id]
        for i in range(vlen):
            name_off, mtype, offset = _MEMBER.unpack_from(self._data, pos + 12 * i)
            bits = offset & 0xFFFFFF if kflag else offset  # kind_flag: bitfield size in the top 8 bits
            yield (self._name(name_off) if name_off else b""), mtype, bits

    def _resolve(self, type_id: int) -> int:
        # Through typedefs and qualifiers to the struct or union itself.
        while self._types[type_id][0] in (8, 9, 10, 11, 18):
            type_id = _TYPE.unpack_from(self._data, self._types[type_id][2] - _TYPE.size)[2]
        return type_id

    def _find(self, type_id: int, member: bytes) -> int | None:
        for name, mtype, bits in self._members(type_id):
            if name == member:
                return bits
            if not name:  # an anonymous struct or union: its members are the parent's
                inner = self._resolve(mtype)
                if self._types[inner][0] in (_STRUCT, _UNION):
                    found = self._find(inner, member)
                    if found is not None:
                        return bits + found
        return None

    def offsetof(self, struct_name: str, member: str) -> int:
        """Byte offset of ``member`` in ``struct struct_name`` (BTFError if absent)."""
        type_id = self._by_name.get(struct_name.encode())
        if type_id is None:
            raise BTFError(f"no struct {struct_name} in the kernel's BTF")
        bits = self._find(type_id, member.encode())
        if bits is None:
            raise BTFError(f"struct {struct_name} has no member {member}")
        if bits % 8:
            raise BTFError(f"{struct_name}.{member} is a bitfield")
        return bits // 8


@functools.cache
def vmlinux() -> BTF:
    """The running kernel's BTF (BTFError or OSError when the kernel has none)."""
    return BTF(VMLINUX.read_bytes())
