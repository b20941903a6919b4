"""LaMP benchmark files -> a population in the on-device format.

LaMP ("LaMP: When Large Language Models Meet Personalization", Salemi et al.,
2023) ships, per task and split, two JSON files:

``questions``
    a list of ``{"id": ..., "input": ..., "profile": [ITEM, ...]}``, one per
    user, where every profile ITEM is ``{"id": ..., <task fields>}``, e.g.
    ``text`` (LaMP-7 tweets), ``title`` + ``abstract`` (LaMP-1, LaMP-5),
    ``text`` + ``title`` (LaMP-4, LaMP-6), ``text`` + ``score`` (LaMP-3),
    ``description`` + ``tag`` (LaMP-2, movies);
``outputs``
    ``{"task": "LaMP_X", "golds": [{"id": ..., "output": ...}, ...]}``.

Each question is one user, with role ``train``. The user's profile items are
its training records (``data.jsonl``), in file order, and the question's
``input``/``output`` pair is its one test record (``test.jsonl``).

A profile item becomes a record as follows (the first non-empty field of each
kind wins, in the order listed):

* content (:data:`CONTENT_FIELDS`: ``text``, ``abstract``, ``description``)
  and a label (:data:`LABEL_FIELDS`: ``title``, ``tag``, ``score``):
  ``Record(prompt=content, response=label)``. This is the direction LaMP's
  generation tasks ask for (a headline or title from the article or abstract,
  a tag from the description, a score from the review), so the user's own
  items teach what their test question tests;
* content only: ``Record(response=content)`` (a sample of the user's writing);
* a written label only (``title`` or ``tag``, e.g. a paper listed without
  its abstract): ``Record(response=label)``. A bare score is not text and does
  not count.

The prompt is the content verbatim: LaMP's per-task instruction (e.g.
"Generate a title for the following abstract of a paper: ...") is only in
``input``, never in the profile, and wrapping the content in a guessed
template would make the training prompts differ from LaMP's in ways no one
chose. Other item fields (``id``, ``date``, ``category``, ...) are dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shared.data.userdata import (
    ROLE_TRAIN,
    USER_ID_PATTERN,
    DataFormatError,
    Population,
    Profile,
    Record,
    UserData,
    write_population,
)

CONTENT_FIELDS = ("text", "abstract", "description")
LABEL_FIELDS = ("title", "tag", "score")
# Labels that are the user's own writing, so they stand as a record on their own.
WRITTEN_LABEL_FIELDS = ("title", "tag")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def load_lamp(questions_path: Path | str, outputs_path: Path | str, *,
              task: str | None = None) -> list[tuple[str, UserData]]:
    """Read one LaMP split as ``(role, user)`` pairs, one user per question.

    Parameters
    ----------
    questions_path
        LaMP questions file (a JSON list of questions with their profiles).
    outputs_path
        LaMP outputs file (``{"task": ..., "golds": [...]}``); every question
        needs exactly one gold output and every gold output one question.
    task
        Task name, e.g. ``"LaMP_7"``. Taken from the outputs file's ``"task"``
        when omitted; when both are given they must agree, so that files of
        two different tasks are never paired by accident.

    Returns
    -------
    list of (str, UserData)
        ``(ROLE_TRAIN, user)`` in the order of the questions file (never
        empty: a questions file with no questions is an error). A user's
        id is ``lamp-<task number>-<question id>`` (see :func:`lamp_user_id`)
        and its profile attributes are ``{"task": task, "lamp_id": id}``.

    Raises
    ------
    DataFormatError
        A file is missing or not valid JSON, or breaks LaMP's schema; the
        message names the file and, where there is one, the question.
    """
    questions_path, outputs_path = Path(questions_path), Path(outputs_path)
    questions = _read_json(questions_path)
    outputs = _read_json(outputs_path)
    task = _task(outputs, outputs_path, task)
    golds = _golds(outputs, outputs_path)
    if not isinstance(questions, list):
        raise DataFormatError(f"{questions_path}: must hold a JSON list of questions "
                              f"(got {type(questions).__name__})")
    if not questions:
        raise DataFormatError(f"{questions_path}: no questions (nothing to convert)")

    users: list[tuple[str, UserData]] = []
    seen: dict[str, str] = {}  # user id -> LaMP id, to catch ids that sanitize alike
    for index, question in enumerate(questions):
        where = f"{questions_path}: question {index}"
        if not isinstance(question, dict):
            raise DataFormatError(f"{where}: must be a JSON object")
        if "id" not in question:
            raise DataFormatError(f"{where}: missing 'id'")
        lamp_id = _id(question["id"], f"{where}: 'id'")
        where = f"{questions_path}: question {index} (id {lamp_id!r})"
        for key in ("input", "profile"):
            if key not in question:
                raise DataFormatError(f"{where}: missing {key!r}")
        try:
            user_id = lamp_user_id(task, lamp_id)
        except DataFormatError as err:
            raise DataFormatError(f"{where}: {err}") from None
        if user_id in seen:
            raise DataFormatError(f"{where}: user id {user_id!r} is already taken by "
                                  f"question id {seen[user_id]!r}")
        seen[user_id] = lamp_id
        prompt = question["input"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFormatError(f"{where}: 'input' must be a non-empty string")
        if lamp_id not in golds:
            raise DataFormatError(f"{outputs_path}: no output for question {index} "
                                  f"(id {lamp_id!r}) of {questions_path}")
        train = _profile_records(question["profile"], where)
        profile = Profile(user_id=user_id, persona=None,
                          attributes={"task": task, "lamp_id": lamp_id})
        test = (Record(prompt=prompt, response=golds[lamp_id]),)
        users.append((ROLE_TRAIN, UserData(profile=profile, train=train, test=test)))

    lamp_ids = set(seen.values())
    orphans = [gold_id for gold_id in golds if gold_id not in lamp_ids]
    if orphans:
        shown = ", ".join(repr(o) for o in orphans[:5]) + (", ..." if len(orphans) > 5 else "")
        raise DataFormatError(f"{outputs_path}: {len(orphans)} output id(s) match no question "
                              f"of {questions_path}: {shown}")
    return users


def write_lamp_population(questions_path: Path | str, outputs_path: Path | str,
                          out_dir: Path | str, *, force: bool = False,
                          task: str | None = None) -> Population:
    """Convert one LaMP split and write it as a population at ``out_dir``.

    Parameters
    ----------
    questions_path, outputs_path
        The split's LaMP files, as for :func:`load_lamp`.
    out_dir
        Population directory to write.
    force
        Replace an existing, non-empty ``out_dir``.
    task
        As for :func:`load_lamp`.

    Returns
    -------
    Population
        The written population, read back; its meta is ``{"source": "lamp",
        "task": ..., "questions": <file name>, "outputs": <file name>}``.

    Raises
    ------
    DataFormatError
        The LaMP files are malformed; nothing is written.
    FileExistsError
        ``out_dir`` exists, is not empty, and ``force`` is not set.
    """
    questions_path, outputs_path = Path(questions_path), Path(outputs_path)
    # Convert everything before touching out_dir: a bad file must not cost an
    # existing population, and write_population is all-or-nothing from here on.
    users = load_lamp(questions_path, outputs_path, task=task)
    task = users[0][1].profile.attributes["task"]  # load_lamp never returns no users
    meta = {"source": "lamp", "task": task,
            "questions": questions_path.name, "outputs": outputs_path.name}
    return write_population(Path(out_dir), users, meta, force=force)


def lamp_user_id(task: str, lamp_id: str) -> str:
    """``lamp-<task>-<id>``, safe as a user directory name.

    The task's own ``LaMP`` prefix is dropped (``"LaMP_7"`` -> ``lamp-7-...``)
    so the id does not say "lamp" twice; characters a user id may not hold
    become ``-``.

    Raises
    ------
    DataFormatError
        The result is not a valid user id (e.g. longer than 128 characters).
    """
    slug = _UNSAFE.sub("-", task).strip("-._").lower()
    slug = re.sub(r"^lamp[-_.]*", "", slug) or "task"
    user_id = f"lamp-{slug}-{_UNSAFE.sub('-', lamp_id)}"
    if not USER_ID_PATTERN.match(user_id):
        raise DataFormatError(f"LaMP id {lamp_id!r} of task {task!r} gives an invalid "
                              f"user id {user_id!r}")
    return user_id


# -- helpers ------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataFormatError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise DataFormatError(f"{path}: unreadable ({err.strerror or err})") from None


def _task(outputs: Any, path: Path, task: str | None) -> str:
    if not isinstance(outputs, dict):
        raise DataFormatError(f"{path}: must hold a JSON object with 'task' and 'golds' "
                              f"(got {type(outputs).__name__})")
    found = outputs.get("task")
    if found is not None and (not isinstance(found, str) or not found.strip()):
        raise DataFormatError(f"{path}: 'task' must be a non-empty string")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise ValueError(f"task must be a non-empty string (got {task!r})")
    if task is not None and found is not None and task != found:
        raise DataFormatError(f"{path}: holds task {found!r}, not {task!r}")
    if task is None and found is None:
        raise DataFormatError(f"{path}: missing 'task' (or pass task=...)")
    chosen = task if task is not None else found
    assert chosen is not None  # both None was refused above
    return chosen


def _golds(outputs: dict[str, Any], path: Path) -> dict[str, str]:
    golds = outputs.get("golds")
    if not isinstance(golds, list):
        raise DataFormatError(f"{path}: 'golds' must be a JSON list")
    found: dict[str, str] = {}
    for index, gold in enumerate(golds):
        where = f"{path}: gold {index}"
        if not isinstance(gold, dict) or "id" not in gold or "output" not in gold:
            raise DataFormatError(f"{where}: must be an object with 'id' and 'output'")
        gold_id = _id(gold["id"], f"{where}: 'id'")
        where = f"{path}: gold {index} (id {gold_id!r})"
        if gold_id in found:
            raise DataFormatError(f"{where}: duplicate id")
        output = gold["output"]
        # A test record's response must be non-empty text (see userdata.parse_record).
        if not isinstance(output, str) or not output.strip():
            raise DataFormatError(f"{where}: 'output' must be a non-empty string")
        found[gold_id] = output
    return found


def _id(value: Any, where: str) -> str:
    # LaMP's ids are numeric strings; accept plain ints too, since re-exported
    # files sometimes lose the quotes. bool is an int in Python, and never an id.
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataFormatError(f"{where}: must be a non-empty string or integer (got {value!r})")
    return str(value)


def _profile_records(profile: Any, where: str) -> tuple[Record, ...]:
    if not isinstance(profile, list):
        raise DataFormatError(f"{where}: 'profile' must be a JSON list")
    if not profile:
        raise DataFormatError(f"{where}: empty profile (a user needs training records)")
    records = []
    for index, item in enumerate(profile):
        item_where = f"{where}, profile item {index}"
        if not isinstance(item, dict):
            raise DataFormatError(f"{item_where}: must be a JSON object")
        if "id" in item:
            item_where += f" (id {item['id']!r})"
        records.append(_item_record(item, item_where))
    return tuple(records)


def _item_record(item: dict[str, Any], where: str) -> Record:
    content = _first_text(item, CONTENT_FIELDS)
    label = _first_text(item, LABEL_FIELDS)
    if content is not None and label is not None:
        return Record(prompt=content, response=label)
    if content is not None:
        return Record(response=content)
    written = _first_text(item, WRITTEN_LABEL_FIELDS)
    if written is not None:
        return Record(response=written)
    raise DataFormatError(f"{where}: no usable text field (needs a non-empty one of "
                          f"{', '.join(CONTENT_FIELDS + WRITTEN_LABEL_FIELDS)})")


def _first_text(item: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    for name in fields:
        value = item.get(name)
        # LaMP-3 scores are strings in the release but numbers in some copies;
        # any other field must already be text.
        if name == "score" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return value
    return None
