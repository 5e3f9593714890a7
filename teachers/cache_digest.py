"""The teacher cache's content check: a SHA-256 per block of rows of embeddings.f16, recorded in manifest.json when
the cache is finished and compared whenever a run opens it (teachers/cache.py).

A block is BLOCK_BYTES of whole rows (64 MiB: 32,768 rows of a 512-d teacher), so a damaged block names the rows to
embed again, and a multi-GB cache is checked at the disk's speed: the blocks are hashed by several threads at once
(hashlib and os.pread release the GIL). The record:

    "digest": {"algorithm": "sha256", "block_rows": R, "blocks": [hex digest of rows [i*R, (i+1)*R), ...]}
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

DIGEST_KEY = "digest"
BLOCK_BYTES = 64 << 20  # rows a block holds: this many bytes of them (at least one row)
_READ_BYTES = 8 << 20  # what one pread reads (a block is hashed in pieces: little memory per thread)


def block_rows(row_bytes: int) -> int:
    """Rows per block for rows of `row_bytes` bytes."""
    return max(1, BLOCK_BYTES // row_bytes)


def block_span(block: int, rows_per_block: int, num_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of `block`."""
    return block * rows_per_block, min(num_rows, (block + 1) * rows_per_block)


def _hash_block(path: str, row_bytes: int, rows_per_block: int, num_rows: int, block: int) -> str:
    start, stop = block_span(block, rows_per_block, num_rows)
    offset, end = start * row_bytes, stop * row_bytes
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        while offset < end:
            piece = os.pread(fd, min(_READ_BYTES, end - offset), offset)
            if not piece:  # shorter than its manifest says: the caller has checked the size
                raise OSError(f"{path}: ends at byte {offset}, before its rows end ({end})")
            h.update(piece)
            offset += len(piece)
    finally:
        os.close(fd)
    return h.hexdigest()


def block_digests(path: str, row_bytes: int, rows_per_block: int, num_rows: int, blocks=None) -> dict:
    """{block: SHA-256 of its bytes} of `blocks` (default: every block) of the file at `path`, hashed in parallel."""
    count = -(-num_rows // rows_per_block)
    blocks = list(range(count)) if blocks is None else sorted(set(blocks))
    threads = max(1, min(4, os.cpu_count() or 1, len(blocks)))
    with ThreadPoolExecutor(threads) as pool:
        found = pool.map(lambda b: _hash_block(path, row_bytes, rows_per_block, num_rows, b), blocks)
        return dict(zip(blocks, found, strict=True))


def new_record(path: str, row_bytes: int, num_rows: int) -> dict:
    """The digest record of the whole file as it is now."""
    rows = block_rows(row_bytes)
    found = block_digests(path, row_bytes, rows, num_rows)
    return {"algorithm": "sha256", "block_rows": rows, "blocks": [found[b] for b in sorted(found)]}


def record_is_valid(record, num_rows: int) -> bool:
    """Whether `record` is a digest record of a cache of `num_rows` rows (not one damaged or edited by hand)."""
    if not isinstance(record, dict) or record.get("algorithm") != "sha256":
        return False
    rows, blocks = record.get("block_rows"), record.get("blocks")
    return isinstance(rows, int) and rows >= 1 and isinstance(blocks, list) \
        and len(blocks) == -(-num_rows // rows) and all(isinstance(b, str) and len(b) == 64 for b in blocks)


def damaged_blocks(path: str, record: dict, row_bytes: int, num_rows: int) -> list:
    """The blocks whose bytes no longer have the digest `record` holds for them."""
    found = block_digests(path, row_bytes, record["block_rows"], num_rows)
    return [b for b in sorted(found) if found[b] != record["blocks"][b]]


def describe_blocks(blocks: list, rows_per_block: int, num_rows: int, most: int = 4) -> str:
    """'block 3 (rows 96..127), ...' for the first `most` blocks, then how many more."""
    shown = [f"block {b} (rows {block_span(b, rows_per_block, num_rows)[0]}.."
             f"{block_span(b, rows_per_block, num_rows)[1] - 1})" for b in blocks[:most]]
    more = f" and {len(blocks) - most} more" if len(blocks) > most else ""
    return ", ".join(shown) + more
