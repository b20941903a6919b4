"""Counts of a population by persona and role: users, records, tokens."""

from __future__ import annotations

from collections.abc import Callable

from shared.data.userdata import (
    ROLE_COLD_CHARACTER,
    ROLE_COLD_PLAY,
    ROLE_TRAIN,
    Population,
    load_user,
)


def summarize(population: Population, count_tokens: Callable[[str], int]) -> list[dict]:
    """One row per persona plus a total row: users by role, records and tokens."""
    rows: dict[str, dict] = {}
    for entry in population.users:
        row = rows.setdefault(entry.persona or "(none)", {
            "persona": entry.persona or "(none)", "train users": 0,
            "cold-start (character)": 0, "cold-start (play)": 0,
            "train records": 0, "test records": 0, "train tokens": 0})
        key = {ROLE_TRAIN: "train users", ROLE_COLD_CHARACTER: "cold-start (character)",
               ROLE_COLD_PLAY: "cold-start (play)"}[entry.role]
        row[key] += 1
        row["train records"] += entry.num_train
        row["test records"] += entry.num_test
        user = load_user(population.user_dir(entry.user_id), allow_empty=True)
        row["train tokens"] += sum(count_tokens(r.prompt + r.response) for r in user.train)
    ordered = [rows[k] for k in sorted(rows)]
    for column in ("cold-start (character)", "cold-start (play)"):  # words the data has
        if not any(row[column] for row in ordered):
            for row in ordered:
                del row[column]
    total = {"persona": "total"}
    for key in ordered[0] if ordered else ():
        if key != "persona":
            total[key] = sum(r[key] for r in ordered)
    return ordered + [total] if ordered else []
