# The compiled packer (file_created_pack.c, built by setup.py).
RECORD_SIZE: int
ABS_SIZE: int

def pack(data: bytes, size: int, start: int, wall_offset_ns: int, kind: int, out: list[bytes], /) -> int: ...
