"""English sentences available offline: the prose of Python's own documentation (`pydoc_data.topics`, shipped with
CPython). The command line calibrates on them when a model has a tokenizer and no `--calib-file` is given; the
benchmarks evaluate sentence embeddings on them."""

from __future__ import annotations

import functools
import re


@functools.cache
def english_sentences() -> tuple[str, ...]:
    """Sentences of 6-40 words that start with a capital and end with a period, free of code; about 1,400."""
    import pydoc_data.topics as topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics.values()))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return tuple(s for s in found if 6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".")
                 and not re.search(r"[<>{}\[\]=*\\`|]|::|\(\)", s))
