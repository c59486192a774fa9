"""Teachers: a batch of items in, L2-normalised float32 vectors out, plus a fingerprint that keys the cache."""
from .base import Teacher, load_teacher, teacher_fingerprint

__all__ = ["Teacher", "load_teacher", "teacher_fingerprint"]
