"""Face-recognition data without MXNet: insightface RecordIO, verification .bin sets, image folders,
and synthetic face identities written in those same formats."""

from distill.data.recordio_writer import write_insightface_rec
from distill.data.verification import write_verification_bin

__all__ = ["write_insightface_rec", "write_verification_bin"]
