# The compiled packer (file_created_pack.c, built by setup.py).
RECORD_SIZE: int

def pack(data: bytes, start: int, wall_offset_ns: int, kind: int, out: list[bytes], /) -> int: ...
