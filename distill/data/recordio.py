"""Read MXNet RecordIO (`train.rec` + `train.idx`) in insightface and im2rec layouts, without MXNet."""

import struct

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
# IRHeader: flag uint32, label float32, id uint64, id2 uint64 (24 bytes, little-endian as written on x86).
IRHEADER = struct.Struct("<IfQQ")
