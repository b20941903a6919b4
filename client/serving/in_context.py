"""In-context personalization, the baseline that trains nothing: each test record is
scored after the user's own training records, as many as fit a token budget.

Two ways to choose them: the most recent (the user's latest lines), and the most
similar to the test record's prompt by bag-of-words cosine (a plain retrieval;
Lewis et al., "Retrieval-Augmented Generation", 2020, with the simplest retriever).
Only training records enter a context, and only the test record's own response
tokens are scored (:func:`shared.model.lm.encode_in_context`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from shared.data.userdata import Record
from shared.model.lm import EncodedRecords, encode_in_context

_WORD = re.compile(r"\w+")


def bag_of_words(text: str) -> Counter:
    """Lower-cased word counts (``\\w+`` runs)."""
    return Counter(_WORD.findall(text.lower()))


def cosine(a: Counter, b: Counter) -> float:
    """Cosine similarity of two count vectors; 0 when either is empty."""
    dot = sum(count * b[word] for word, count in a.items())
    norm = math.sqrt(sum(c * c for c in a.values())) * math.sqrt(sum(c * c for c in b.values()))
    return dot / norm if norm else 0.0


def record_text(record: Record) -> str:
    return f"{record.prompt} {record.response}" if record.prompt else record.response


def most_similar(query: str, records: Sequence[Record]) -> list[int]:
    """Indices of ``records`` by bag-of-words cosine to ``query``, highest first; ties go
    to the more recent record (the later index)."""
    q = bag_of_words(query)
    scores = [cosine(q, bag_of_words(record_text(r))) for r in records]
    return sorted(range(len(records)), key=lambda i: (-scores[i], -i))


def retrieval_query(record: Record, train: Sequence[Record]) -> str:
    """What the retrieval may look at for ``record``: its prompt, never its response.
    A record without a prompt (a Shakespeare line is one speech, no cue) falls back on
    the user's latest training line, so no test text steers the choice."""
    if record.prompt:
        return record.prompt
    return record_text(train[-1]) if train else ""


def in_context_data(records: Sequence[Record], train: Sequence[Record], tokenizer, *,
                    seq_len: int, context_tokens: int, retrieve: bool) -> EncodedRecords:
    """``records`` encoded after their context from ``train`` (chronological, latest last):
    the most recent records first (``retrieve=False``) or the most similar
    (:func:`most_similar` on :func:`retrieval_query`), within ``context_tokens``."""
    recent = list(reversed(train))
    contexts = [[train[i] for i in most_similar(retrieval_query(r, train), train)]
                if retrieve else recent for r in records]
    return encode_in_context(records, contexts, tokenizer, seq_len=seq_len,
                             context_tokens=context_tokens)
