# The compiled packer (file_created_pack.c, built by setup.py).
from array import array

RECORD_SIZE: int
ABS_SIZE: int
DIR_IN_ROOT: int
PATH_TRUNCATED: int

def pack(
    data: bytes, size: int, start: int, wall_offset_ns: int, kind: int, out: bytearray, sizes: array[int], /
) -> int: ...
