"""LaMP files -> on-device population (shared.data.lamp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.data.lamp import lamp_user_id, load_lamp, write_lamp_population
from shared.data.userdata import (
    DATA_FILE,
    MANIFEST_FILE,
    ROLE_TRAIN,
    TEST_FILE,
    USER_ID_PATTERN,
    DataFormatError,
    Profile,
    Record,
    load_population,
    load_user,
)

FIXTURES = Path(__file__).parent / "fixtures" / "lamp"
L7_Q, L7_O = FIXTURES / "lamp7_questions.json", FIXTURES / "lamp7_outputs.json"
L5_Q, L5_O = FIXTURES / "lamp5_questions.json", FIXTURES / "lamp5_outputs.json"
PARAPHRASE = "Paraphrase the following tweet without any explanation before or after it: "


def _write_split(tmp_path: Path, questions, outputs) -> tuple[Path, Path]:
    """Write a LaMP split (anything JSON-able, or raw text) and return its two paths."""
    q, o = tmp_path / "questions.json", tmp_path / "outputs.json"
    for path, obj in ((q, questions), (o, outputs)):
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return q, o


def _good_split() -> tuple[list, dict]:
    questions = [
        {"id": "1", "input": "in one", "profile": [{"id": "a", "text": "first"}]},
        {"id": "2", "input": "in two", "profile": [{"id": "b", "text": "second"}]},
    ]
    outputs = {"task": "LaMP_7", "golds": [{"id": "1", "output": "out one"},
                                           {"id": "2", "output": "out two"}]}
    return questions, outputs


# -- conversion ----------------------------------------------------------------------------

def test_lamp7_converts_every_question_to_one_train_user():
    # Act
    users = load_lamp(L7_Q, L7_O)

    # Assert
    assert [role for role, _ in users] == [ROLE_TRAIN] * 3
    assert [u.profile.user_id for _, u in users] == ["lamp-7-7000", "lamp-7-7001", "lamp-7-7002"]
    assert users[0][1].profile == Profile(user_id="lamp-7-7000", persona=None,
                                          attributes={"task": "LaMP_7", "lamp_id": "7000"})


def test_lamp7_text_items_become_text_records_and_question_the_test_record():
    # Act
    users = dict((u.profile.user_id, u) for _, u in load_lamp(L7_Q, L7_O))

    # Assert: golds are matched by id, not by position (the outputs file is shuffled)
    first = users["lamp-7-7000"]
    assert first.train == (Record(response="coffee first, opinions later"),
                           Record(response="rain all day. perfect excuse to read"))
    assert first.test == (Record(
        prompt=PARAPHRASE + "the train is late again, third time this week",
        response="late train, again. third time this week"),)
    assert users["lamp-7-7002"].test[0].response == (
        "friday can't come soon enough, new album incoming")
    assert [len(u.train) for u in users.values()] == [2, 1, 3]


def test_lamp5_title_abstract_items_become_abstract_to_title_pairs():
    # Act
    users = load_lamp(L5_Q, L5_O)

    # Assert: an item whose abstract is empty still contributes its title as text
    _, first = users[0]
    assert first.profile.user_id == "lamp-5-5000"
    assert first.profile.attributes == {"task": "LaMP_5", "lamp_id": "5000"}
    assert first.train == (
        Record(prompt="Adapters with few parameters make training on phones practical.",
               response="Sparse Adapters for On-Device Learning"),
        Record(response="A Survey of Client Drift"),
    )
    assert first.test == (Record(
        prompt="Generate a title for the following abstract of a paper: We study federated "
               "fine-tuning of language models under differential privacy.",
        response="Private Federated Fine-Tuning of Language Models"),)


@pytest.mark.parametrize("item, expected", [
    ({"id": "x", "text": "great blender", "score": "5"},
     Record(prompt="great blender", response="5")),  # LaMP-3
    ({"id": "x", "text": "great blender", "score": 4},
     Record(prompt="great blender", response="4")),  # numeric score
    ({"id": "x", "description": "a heist goes wrong", "tag": "crime"},
     Record(prompt="a heist goes wrong", response="crime")),  # LaMP-2 movies
    ({"id": "x", "text": "body of the article", "title": "Headline", "category": "sports"},
     Record(prompt="body of the article", response="Headline")),  # LaMP-4
    ({"id": "x", "text": "just text", "date": "2020-01-01"}, Record(response="just text")),
])
def test_profile_item_fields_map_to_records(tmp_path, item, expected):
    # Arrange
    q, o = _write_split(tmp_path, [{"id": "1", "input": "in", "profile": [item]}],
                        {"task": "LaMP_3", "golds": [{"id": "1", "output": "out"}]})

    # Act
    [(_, user)] = load_lamp(q, o)

    # Assert
    assert user.train == (expected,)


def test_integer_ids_and_explicit_task_are_accepted(tmp_path):
    # Arrange: ids without quotes and an outputs file without "task"
    q, o = _write_split(tmp_path, [{"id": 12, "input": "in", "profile": [{"text": "t"}]}],
                        {"golds": [{"id": "12", "output": "out"}]})

    # Act
    [(_, user)] = load_lamp(q, o, task="LaMP_7")

    # Assert
    assert user.profile.user_id == "lamp-7-12"
    assert user.profile.attributes == {"task": "LaMP_7", "lamp_id": "12"}


@pytest.mark.parametrize("task, lamp_id, expected", [
    ("LaMP_7", "310", "lamp-7-310"),
    ("LaMP-2", "a b/c", "lamp-2-a-b-c"),
    ("custom", "9", "lamp-custom-9"),
])
def test_lamp_user_id_is_a_valid_user_id(task, lamp_id, expected):
    # Act
    user_id = lamp_user_id(task, lamp_id)

    # Assert
    assert user_id == expected
    assert USER_ID_PATTERN.match(user_id)


# -- writing and reading back --------------------------------------------------------------

def test_write_lamp_population_round_trips_through_the_loaders(tmp_path):
    # Arrange
    out = tmp_path / "pop"
    expected = load_lamp(L7_Q, L7_O)

    # Act
    written = write_lamp_population(L7_Q, L7_O, out)

    # Assert
    population = load_population(out)
    assert population.meta == {"source": "lamp", "task": "LaMP_7",
                               "questions": "lamp7_questions.json",
                               "outputs": "lamp7_outputs.json"}
    assert written.users == population.users
    assert [(e.user_id, e.role, e.persona, e.num_train, e.num_test) for e in population.users] == [
        ("lamp-7-7000", ROLE_TRAIN, None, 2, 1),
        ("lamp-7-7001", ROLE_TRAIN, None, 1, 1),
        ("lamp-7-7002", ROLE_TRAIN, None, 3, 1)]
    for _, user in expected:
        assert load_user(population.user_dir(user.profile.user_id)) == user


def test_written_files_use_text_and_prompt_response_records(tmp_path):
    # Act
    population = write_lamp_population(L5_Q, L5_O, tmp_path / "pop")

    # Assert
    user_dir = population.user_dir("lamp-5-5000")
    train = [json.loads(line) for line in (user_dir / DATA_FILE).read_text().splitlines()]
    test = [json.loads(line) for line in (user_dir / TEST_FILE).read_text().splitlines()]
    assert train == [
        {"prompt": "Adapters with few parameters make training on phones practical.",
         "response": "Sparse Adapters for On-Device Learning"},
        {"text": "A Survey of Client Drift"}]
    assert test == [{"prompt": "Generate a title for the following abstract of a paper: We "
                               "study federated fine-tuning of language models under "
                               "differential privacy.",
                     "response": "Private Federated Fine-Tuning of Language Models"}]


def test_existing_population_needs_force(tmp_path):
    # Arrange
    out = tmp_path / "pop"
    write_lamp_population(L7_Q, L7_O, out)

    # Act / Assert
    with pytest.raises(FileExistsError):
        write_lamp_population(L5_Q, L5_O, out)
    replaced = write_lamp_population(L5_Q, L5_O, out, force=True)
    assert [e.user_id for e in replaced.users] == ["lamp-5-5000", "lamp-5-5001"]
    assert sorted(p.name for p in (out / "users").iterdir()) == ["lamp-5-5000", "lamp-5-5001"]


# -- errors --------------------------------------------------------------------------------

def _profile_item_without_text():
    questions, outputs = _good_split()
    questions[1]["profile"].append({"id": "c", "date": "2020", "score": "3"})
    return questions, outputs


def _missing(key):
    def make():
        questions, outputs = _good_split()
        del questions[1][key]
        return questions, outputs
    return make


def _with(question_changes=None, outputs=None):
    def make():
        questions, good_outputs = _good_split()
        questions[1].update(question_changes or {})
        return questions, outputs if outputs is not None else good_outputs
    return make


# (case, builder, file whose name the message must hold, other text it must hold)
ERROR_CASES = [
    ("questions not JSON", lambda: ("[{not json", _good_split()[1]), "questions", "not valid JSON"),
    ("outputs not JSON", lambda: (_good_split()[0], '{"task": '), "outputs", "not valid JSON"),
    ("questions not a list", lambda: ({"id": "1"}, _good_split()[1]), "questions", "JSON list"),
    ("no questions", lambda: ([], {"task": "LaMP_7", "golds": []}), "questions", "no questions"),
    ("missing id", _missing("id"), "questions", "question 1: missing 'id'"),
    ("missing input", _missing("input"), "questions", "question 1 (id '2'): missing 'input'"),
    ("missing profile", _missing("profile"), "questions",
     "question 1 (id '2'): missing 'profile'"),
    ("empty profile", _with({"profile": []}), "questions", "question 1 (id '2'): empty profile"),
    ("item without text", _profile_item_without_text, "questions",
     "question 1 (id '2'), profile item 1 (id 'c'): no usable text field"),
    ("item not an object", _with({"profile": ["just a string"]}), "questions",
     "profile item 0: must be a JSON object"),
    ("empty input", _with({"input": "  "}), "questions", "'input' must be a non-empty string"),
    ("output for no question", _with(outputs={"task": "LaMP_7", "golds": [
        {"id": "1", "output": "o"}, {"id": "2", "output": "o"}, {"id": "99", "output": "o"}]}),
     "outputs", "match no question"),
    ("question without output", _with(outputs={"task": "LaMP_7", "golds": [
        {"id": "1", "output": "o"}]}), "outputs", "no output for question 1 (id '2')"),
    ("empty output", _with(outputs={"task": "LaMP_7", "golds": [
        {"id": "1", "output": "o"}, {"id": "2", "output": ""}]}), "outputs",
     "gold 1 (id '2'): 'output' must be a non-empty string"),
    ("duplicate gold", _with(outputs={"task": "LaMP_7", "golds": [
        {"id": "1", "output": "o"}, {"id": "2", "output": "o"}, {"id": "2", "output": "o"}]}),
     "outputs", "duplicate id"),
    ("duplicate question", _with({"id": "1"}), "questions", "already taken"),
    ("id too long for a user id", _with({"id": "9" * 200}), "questions", "invalid user id"),
    ("no task", _with(outputs={"golds": [{"id": "1", "output": "o"}, {"id": "2", "output": "o"}]}),
     "outputs", "missing 'task'"),
]


@pytest.mark.parametrize("build, file_key, text",
                         [case[1:] for case in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_malformed_split_raises_data_format_error_naming_the_file(tmp_path, build, file_key, text):
    # Arrange
    q, o = _write_split(tmp_path, *build())
    named = {"questions": q, "outputs": o}[file_key]

    # Act
    with pytest.raises(DataFormatError) as caught:
        load_lamp(q, o)

    # Assert
    message = str(caught.value)
    assert str(named) in message
    assert text in message
    assert "\n" not in message


def test_missing_file_raises_data_format_error(tmp_path):
    # Arrange
    missing = tmp_path / "nope.json"

    # Act / Assert
    with pytest.raises(DataFormatError, match="nope.json: missing"):
        load_lamp(missing, L7_O)


def test_task_argument_must_agree_with_outputs_file():
    # Act / Assert
    with pytest.raises(DataFormatError, match=r"lamp7_outputs\.json: holds task 'LaMP_7', "
                                              r"not 'LaMP_5'"):
        load_lamp(L7_Q, L7_O, task="LaMP_5")


def test_failed_write_leaves_no_output_directory(tmp_path):
    # Arrange
    questions, outputs = _profile_item_without_text()
    src = tmp_path / "src"
    src.mkdir()
    q, o = _write_split(src, questions, outputs)
    out = tmp_path / "out" / "pop"

    # Act
    with pytest.raises(DataFormatError, match="questions.json"):
        write_lamp_population(q, o, out)

    # Assert: neither the population nor a staging directory next to it
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_forced_write_keeps_the_existing_population(tmp_path):
    # Arrange
    out = tmp_path / "pop"
    write_lamp_population(L7_Q, L7_O, out)
    before = (out / MANIFEST_FILE).read_text()
    q, o = _write_split(tmp_path, *_profile_item_without_text())

    # Act
    with pytest.raises(DataFormatError):
        write_lamp_population(q, o, out, force=True)

    # Assert
    assert (out / MANIFEST_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs.json", "pop", "questions.json"]
