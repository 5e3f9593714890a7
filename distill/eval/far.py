"""The one spelling of FAR targets: which FARs are measured, and how a FAR is written as a key.

A FAR is written mantissa-exponent without zero padding: `far_key(1e-4) == '1e-4'`, `far_key(1e-6) ==
'1e-6'`, `far_key(5e-4) == '5e-4'`, `far_key(2.5e-4) == '2.5e-4'`. That key names the FAR everywhere: in
result.json and summary.json (`tar_at_far: {'1e-3': ...}` of a verification set, `ijb.tar_at_far: {'1e-4':
TAR, ...}`), in W&B and metrics.jsonl (`val/<set>/tar_at_far_1e-3`, `ijb/<target>/tar_at_far_1e-4`) and in
table headers (`TAR@FAR=1e-3 (%)`, `IJBC TAR@1e-4 (%)`).

Other spellings of a FAR key are read as that key: eval_ijbc.py's column names, str(far) ('1e-06', '1e-05',
'0.0001', '0.001', '0.01', '0.1'), which IJB results of run directories hold (distill/compat.py lists it), and
zero-padded hand-made ones ('1e-04'). `normalise_far_keys` maps one `tar_at_far`, `normalise_results` every
`tar_at_far` of a result.json / summary.json / `distill ijb --json` object. The readers of those files call it
(distill.run.summary on every stage result it summarises, distill.run.compare on summary.json and result.json,
distill.eval.ijb_stage.ijb_scalars, distill.train.tracking), so such run directories summarise, compare and
resume without being evaluated again; their files are left as they are until the stage is evaluated again.
(The IJB feature cache's sidecar holds no FAR keys.) The spelling rules live here rather than in
distill/compat.py because they are far_key's, and distill.compat imports nothing of distill.

What is measured:
  VERIFICATION_FARS  TAR@FAR of insightface .bin sets (distill.eval.verification.tar_at_far_pairs)
  IJB_FARS           IJB-B/C template verification, eval_ijbc.py's x-axis (distill.eval.ijb.tar_at_fars_roc)
  SUMMARY_IJB_FARS   the IJB columns of summary.md and `distill compare` (what face-KD papers report)
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

VERIFICATION_FARS = (1e-3, 1e-4)
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SUMMARY_IJB_FARS = (1e-4, 1e-5)


def far_key(far: float) -> str:
    """1e-4 -> '1e-4', 1e-6 -> '1e-6', 0.1 -> '1e-1', 5e-4 -> '5e-4', 2.5e-4 -> '2.5e-4', 1.0 -> '1e0'.

    The digits are those of the shortest repr of the float (so 0.0001 and 1e-4 are the same key); a FAR
    must be a finite number above 0 and at most 1."""
    try:
        value = float(far)
    except (TypeError, ValueError):
        raise ValueError(f"FAR {far!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"FAR {far!r} must be above 0 and at most 1")
    _, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return f"{mantissa}e{exponent + len(digits) - 1}"


def parse_far_key(key) -> float | None:
    """The FAR a key names, in any spelling ('1e-4', '1e-04', '0.0001'), or None when the key is not a FAR."""
    try:
        value = float(Decimal(str(key).strip()))
    except (InvalidOperation, ValueError):
        return None
    return value if math.isfinite(value) and 0.0 < value <= 1.0 else None


def normalise_far_key(key) -> str:
    """One key in today's spelling: '0.0001' -> '1e-4', '1e-05' -> '1e-5', '1e-3' -> '1e-3'; anything that
    does not name a FAR is returned unchanged."""
    far = parse_far_key(key)
    return str(key) if far is None else far_key(far)


def normalise_far_keys(mapping: dict) -> dict:
    """A {FAR key: value} mapping (a `tar_at_far`) with its keys in today's spelling, order kept; a new dict.

    eval_ijbc.py's spelling: {'1e-06': .5, '0.0001': .7} -> {'1e-6': .5, '1e-4': .7}. When two
    spellings of one FAR are both present, the one already in today's spelling wins."""
    out: dict = {}
    for key, value in mapping.items():
        new = normalise_far_key(key)
        if new not in out or key == new:
            out[new] = value
    return out


def normalise_results(data):
    """A JSON object (result.json, summary.json, a `distill ijb --json` result) with every `tar_at_far`
    mapping in it, at any depth, passed through `normalise_far_keys`. A new object; other values as they were."""
    if isinstance(data, dict):
        return {k: normalise_far_keys(v) if k == "tar_at_far" and isinstance(v, dict) else normalise_results(v)
                for k, v in data.items()}
    if isinstance(data, list):
        return [normalise_results(v) for v in data]
    return data
