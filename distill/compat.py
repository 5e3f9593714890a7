"""Legacy spellings and formats that still load, each with what it maps to.

One place for every old spelling the toolkit still accepts, so the code that reads
configs, checkpoints and teacher specs only ever sees the current form. Each entry
names the old form, the current form it maps to, and the function that does the
mapping. Light: importing this module imports no torch.

Entries:
  (sections are appended below, one per area; each section's docstring lists its entries)
"""

from __future__ import annotations
