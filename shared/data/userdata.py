"""The on-device data format: one directory per user.

::

    USER_DIR/
      profile.json   {"user_id": "...", "persona": "comedies" | null, "attributes": {...}}
      data.jsonl     training records, one JSON object a line:
                     {"text": "..."}  or  {"prompt": "...", "response": "..."}
      test.jsonl     optional held-out records in the same format (evaluation only)

A population (what ``fedpersona data ...`` writes) is ``DIR/population.json``
plus ``DIR/users/<user_id>/``. Every loader error names the file and line.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.util.atomic import replace_dir

PROFILE_FILE = "profile.json"
DATA_FILE = "data.jsonl"
TEST_FILE = "test.jsonl"
MANIFEST_FILE = "population.json"
USERS_DIR = "users"
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")  # $ admits a final "\n"

# Roles of users in a population.
ROLE_TRAIN = "train"
ROLE_COLD_CHARACTER = "cold-start-character"  # a new user joining a known community
ROLE_COLD_PLAY = "cold-start-play"  # a user from a community that took no part in training
ROLES = (ROLE_TRAIN, ROLE_COLD_CHARACTER, ROLE_COLD_PLAY)


class DataFormatError(ValueError):
    """On-device data does not follow the format; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One training or test example. ``prompt`` is context only: no loss is taken on it."""

    response: str
    prompt: str = ""

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response} if self.prompt else {
            "text": self.response}


@dataclass(frozen=True)
class Profile:
    user_id: str
    persona: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "persona": self.persona, "attributes": self.attributes}


@dataclass(frozen=True)
class UserData:
    profile: Profile
    train: tuple[Record, ...]
    test: tuple[Record, ...] = ()


# -- reading ------------------------------------------------------------------------------

def load_profile(user_dir: Path) -> Profile:
    path = Path(user_dir) / PROFILE_FILE
    if not path.is_file():
        raise DataFormatError(f"{path}: missing (every user directory needs a profile.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except _JSON_ERRORS as err:
        raise DataFormatError(f"{path}: not valid JSON ({_reason(err)})") from None
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: must hold a JSON object")
    user_id = raw.get("user_id")
    if not isinstance(user_id, str) or not USER_ID_PATTERN.match(user_id):
        raise DataFormatError(f"{path}: 'user_id' must be a string of letters, digits, "
                              f"'.', '_' or '-' (got {user_id!r})")
    persona = raw.get("persona")
    if persona is not None and (not isinstance(persona, str) or not persona):
        raise DataFormatError(f"{path}: 'persona' must be a non-empty string or null")
    attributes = raw.get("attributes", {})
    if not isinstance(attributes, dict):
        raise DataFormatError(f"{path}: 'attributes' must be a JSON object")
    return Profile(user_id=user_id, persona=persona, attributes=attributes)


def parse_record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: a record must be a JSON object")
    if "text" in obj:
        extra = set(obj) - {"text"}
        if extra:
            shown = (k if k.isprintable() else repr(k) for k in sorted(extra))
            raise DataFormatError(f"{where}: a text record has only 'text' (extra: "
                                  f"{', '.join(shown)})")
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{where}: 'text' must be a non-empty string")
        return Record(response=text)
    if "prompt" in obj or "response" in obj:
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str):
            raise DataFormatError(f"{where}: missing or non-string 'prompt'")
        if not isinstance(response, str) or not response.strip():
            raise DataFormatError(f"{where}: missing or empty 'response'")
        return Record(response=response, prompt=prompt)
    raise DataFormatError(f"{where}: a record needs 'text', or 'prompt' and 'response'")


def load_records(path: Path, *, required: bool = True) -> tuple[Record, ...]:
    path = Path(path)
    if not path.is_file():
        if required:
            raise DataFormatError(f"{path}: missing")
        return ()
    records = []
    try:
        # "\n" only: splitlines() also splits at U+2028 and U+0085, which
        # json.dumps(ensure_ascii=False) leaves unescaped inside a record's strings
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except _JSON_ERRORS as err:
            raise DataFormatError(f"{path}:{lineno}: malformed JSON ({_reason(err)})") from None
        records.append(parse_record(obj, f"{path}:{lineno}"))
    return tuple(records)


# What json.loads raises besides JSONDecodeError: ValueError for an integer of more
# than 4300 digits, RecursionError for deep nesting (UnicodeDecodeError is a ValueError).
_JSON_ERRORS = (ValueError, RecursionError)


def _reason(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return " ".join(str(getattr(err, "msg", err)).split())


def load_user(user_dir: Path, *, allow_empty: bool = False) -> UserData:
    """Load and validate one user's directory."""
    user_dir = Path(user_dir)
    if not user_dir.is_dir():
        raise DataFormatError(f"{user_dir}: user directory does not exist")
    profile = load_profile(user_dir)
    train = load_records(user_dir / DATA_FILE, required=not allow_empty)
    if not train and not allow_empty:
        raise DataFormatError(f"{user_dir / DATA_FILE}: no records (empty user)")
    test = load_records(user_dir / TEST_FILE, required=False)
    return UserData(profile=profile, train=train, test=test)


@dataclass(frozen=True)
class PopulationEntry:
    user_id: str
    role: str
    persona: str | None
    num_train: int
    num_test: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Population:
    root: Path
    users: tuple[PopulationEntry, ...]
    meta: dict[str, Any]

    def user_dir(self, user_id: str) -> Path:
        return self.root / USERS_DIR / user_id

    def with_role(self, *roles: str) -> tuple[PopulationEntry, ...]:
        return tuple(u for u in self.users if u.role in roles)

    @property
    def personas(self) -> tuple[str, ...]:
        return tuple(self.meta.get("personas") or sorted(
            {u.persona for u in self.users if u.persona is not None}))


def load_population(root: Path) -> Population:
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise DataFormatError(f"{root}: data directory does not exist")
    if not path.is_file():
        raise DataFormatError(f"{path}: missing (write a population with 'fedpersona data ...')")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        users = tuple(PopulationEntry(**entry) for entry in raw["users"])
    except (*_JSON_ERRORS, KeyError, TypeError) as err:
        raise DataFormatError(f"{path}: not a valid population manifest "
                              f"({_reason(err)})") from None
    for entry in users:
        _check_entry(entry, path)
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: 'meta' must be a JSON object")
    return Population(root=root, users=users, meta=meta)


def _check_entry(entry: PopulationEntry, path: Path) -> None:
    # user_id becomes a directory name: the pattern keeps it inside users/ (no "..", no "/")
    if not isinstance(entry.user_id, str) or not USER_ID_PATTERN.match(entry.user_id):
        raise DataFormatError(f"{path}: user_id {entry.user_id!r} is not a string of letters, "
                              "digits, '.', '_' or '-'")
    if entry.role not in ROLES:
        raise DataFormatError(f"{path}: user {entry.user_id} has unknown role {entry.role!r}")
    if entry.persona is not None and (not isinstance(entry.persona, str) or not entry.persona):
        raise DataFormatError(f"{path}: user {entry.user_id}: 'persona' must be a non-empty "
                              "string or null")
    for name in ("num_train", "num_test"):
        count = getattr(entry, name)
        if type(count) is not int or count < 0:
            raise DataFormatError(f"{path}: user {entry.user_id}: {name!r} must be an integer "
                                  f">= 0, got {count!r}")
    if not isinstance(entry.attributes, dict):
        raise DataFormatError(f"{path}: user {entry.user_id}: 'attributes' must be a JSON "
                              "object")


# -- writing ------------------------------------------------------------------------------

def write_user(user_dir: Path, data: UserData) -> None:
    """Write one user directory (the caller makes the whole write atomic)."""
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / PROFILE_FILE).write_text(
        json.dumps(data.profile.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    _write_jsonl(user_dir / DATA_FILE, data.train)
    if data.test:
        _write_jsonl(user_dir / TEST_FILE, data.test)


def _write_jsonl(path: Path, records: Sequence[Record]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")


def write_population(out: Path, users: Iterable[tuple[str, UserData]], meta: dict[str, Any],
                     *, force: bool = False, extra_files: dict[str, str] | None = None
                     ) -> Population:
    """Write ``(role, user)`` pairs as a population at ``out``, all or nothing.

    Everything is written into a staging directory next to ``out`` and renamed
    into place at the end, so an error half-way leaves no partial population and
    an existing one is only replaced (with ``force``) once the new one is whole.
    ``extra_files`` (relative path -> text) go in with it, e.g. an audit's plan.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} already exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = []
        for role, data in users:
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} for user {data.profile.user_id}")
            write_user(staging / USERS_DIR / data.profile.user_id, data)
            entries.append(PopulationEntry(
                user_id=data.profile.user_id, role=role, persona=data.profile.persona,
                num_train=len(data.train), num_test=len(data.test),
                attributes=data.profile.attributes))
        manifest = {"meta": meta, "users": [e.__dict__ for e in entries]}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n",
                                             encoding="utf-8")
        for relative, text in (extra_files or {}).items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_text(text, encoding="utf-8")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_population(out)
