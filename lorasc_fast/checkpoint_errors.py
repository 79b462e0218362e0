"""The one error type of ``lorasc merge``: bad input, reported before anything is written."""
from __future__ import annotations


class MergeError(ValueError):
    """A checkpoint merge that cannot (or must not) go ahead; the message says why."""
