"""Your own users as a population: ``fedpersona data import``.

Two layouts are read:

- **a folder with one file per user**: ``<user id>.txt`` (one record per non-empty
  line) or ``<user id>.jsonl`` (one record per line: ``{"text": ...}`` or
  ``{"prompt": ..., "response": ...}``, optionally with the persona field);
- **one JSONL file** whose every line names its user in ``user_field``: ``{"user":
  "ada", "text": "..."}``.

A user's persona (optional) comes from the persona field of its records (one value
per user) or from a ``personas`` mapping (user id -> persona). Each user's records
are split in their order: the last ``test_fraction`` are held out for evaluation
(never trained on), the rest train. Every user is a training user: cold-start users
are a simulation's choice (``cold-start-fraction``), not the data's.

Every error names the file and line, and nothing is written unless the whole
population is read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.data.userdata import (
    ROLE_TRAIN,
    USER_ID_PATTERN,
    DataFormatError,
    Population,
    Profile,
    Record,
    UserData,
    parse_record,
    write_population,
)


@dataclass(frozen=True)
class ImportSettings:
    user_field: str = "user"
    persona_field: str = "persona"
    test_fraction: float = 0.2
    min_records: int = 2  # a user needs a training and a test record

    def __post_init__(self) -> None:
        if not 0 <= self.test_fraction < 1:
            raise DataFormatError(f"test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.min_records < 1:
            raise DataFormatError(f"min-records must be >= 1, got {self.min_records}")


def read_source(source: Path, settings: ImportSettings
                ) -> dict[str, tuple[list[Record], set[str]]]:
    """Per user id: its records in order and the persona values its records named."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataFormatError(f"{source}: no <user>.txt or <user>.jsonl files")
        users = {}
        for path in files:
            user_id = _user_id(path.stem, path)
            if user_id in users:
                raise DataFormatError(f"{path}: user {user_id!r} has two files")
            users[user_id] = (_text_records(path) if path.suffix == ".txt"
                              else _jsonl_user_records(path, settings))
        return users
    if source.is_file():
        return _jsonl_population(source, settings)
    raise DataFormatError(f"{source}: no such file or folder")


def _user_id(raw: str, where: Path | str) -> str:
    user_id = re.sub(r"[^A-Za-z0-9_.\-]+", "-", str(raw).strip()).strip("-.")
    if not USER_ID_PATTERN.match(user_id):
        raise DataFormatError(f"{where}: {raw!r} cannot name a user (letters, digits, '.', "
                              "'_', '-')")
    return user_id


def _text_records(path: Path) -> tuple[list[Record], set[str]]:
    lines = _read(path).splitlines()
    return [Record(response=line.strip()) for line in lines if line.strip()], set()


def _jsonl_lines(path: Path) -> Iterable[tuple[str, dict]]:
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: a record must be a JSON object")
        yield where, obj


def _record(obj: dict, where: str, settings: ImportSettings) -> tuple[Record, str | None]:
    persona = obj.get(settings.persona_field)
    if persona is not None and (not isinstance(persona, str) or not persona.strip()):
        raise DataFormatError(f"{where}: {settings.persona_field!r} must be a non-empty string")
    fields = {k: v for k, v in obj.items() if k in ("text", "prompt", "response")}
    return parse_record(fields, where), persona.strip() if persona else None


def _jsonl_user_records(path: Path, settings: ImportSettings
                        ) -> tuple[list[Record], set[str]]:
    records, personas = [], set()
    for where, obj in _jsonl_lines(path):
        record, persona = _record(obj, where, settings)
        records.append(record)
        personas |= {persona} if persona else set()
    return records, personas


def _jsonl_population(path: Path, settings: ImportSettings
                      ) -> dict[str, tuple[list[Record], set[str]]]:
    users: dict[str, tuple[list[Record], set[str]]] = {}
    for where, obj in _jsonl_lines(path):
        if settings.user_field not in obj:
            raise DataFormatError(f"{where}: no {settings.user_field!r} field naming the user "
                                  "(--user-field)")
        user_id = _user_id(obj[settings.user_field], where)
        record, persona = _record(obj, where, settings)
        records, personas = users.setdefault(user_id, ([], set()))
        records.append(record)
        personas |= {persona} if persona else set()
    if not users:
        raise DataFormatError(f"{path}: no records")
    return users


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err.reason})") from None


def split_user(user_id: str, records: list[Record], persona: str | None,
               test_fraction: float) -> UserData:
    """The last ``test_fraction`` of the records (at least one when there are two or more
    and the fraction is positive) held out, in order."""
    held_out = math.ceil(len(records) * test_fraction) if test_fraction else 0
    held_out = min(held_out, len(records) - 1)
    cut = len(records) - held_out
    return UserData(Profile(user_id, persona, {}), tuple(records[:cut]), tuple(records[cut:]))


def import_population(source: Path, out: Path, settings: ImportSettings, *,
                      personas: Mapping[str, str] | None = None,
                      force: bool = False) -> Population:
    """Read ``source``, check every user, and write the population at ``out``."""
    users = read_source(source, settings)
    chosen: list[tuple[str, UserData]] = []
    skipped = []
    for user_id, (records, named) in sorted(users.items()):
        if len(named) > 1:
            raise DataFormatError(f"{source}: user {user_id} names {len(named)} personas "
                                  f"({', '.join(sorted(named))}); a user has one")
        persona = (personas or {}).get(user_id) or next(iter(named), None)
        if len(records) < settings.min_records:
            skipped.append(user_id)
            continue
        chosen.append((ROLE_TRAIN, split_user(user_id, records, persona,
                                              settings.test_fraction)))
    if personas:
        unknown = sorted(set(personas) - set(users))
        if unknown:
            raise DataFormatError(f"personas name users the source lacks: {', '.join(unknown[:5])}")
    if not chosen:
        raise DataFormatError(f"{source}: no user has {settings.min_records} records or more")
    labels = sorted({u.profile.persona for _, u in chosen if u.profile.persona})
    meta = {"source": f"import ({Path(source).name})", "settings": settings.__dict__,
            "personas": labels, "skipped_users": skipped,
            "persona_label": "persona" if labels else None}
    return write_population(out, chosen, meta, force=force)


def read_persona_map(path: Path) -> dict[str, str]:
    """A JSON object ``{user id: persona}``, or CSV lines ``user,persona``."""
    text = _read(Path(path))
    if Path(path).suffix == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: not JSON ({err.msg})") from None
        if not isinstance(mapping, dict) or not all(
                isinstance(v, str) and v for v in mapping.values()):
            raise DataFormatError(f"{path}: must map user ids to persona names")
        return {_user_id(k, path): v for k, v in mapping.items()}
    mapping = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        user, _, persona = line.partition(",")
        if not persona.strip():
            raise DataFormatError(f"{path}:{number}: expected 'user,persona'")
        mapping[_user_id(user, f"{path}:{number}")] = persona.strip()
    return mapping
