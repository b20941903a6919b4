"""The on-device data format: loading, validation errors, all-or-nothing writes."""

import json

import pytest

from shared.data.userdata import (
    ROLE_TRAIN,
    DataFormatError,
    Profile,
    Record,
    UserData,
    load_population,
    load_user,
    write_population,
)


def make_user_dir(root, *, profile=None, lines=None, name="u1"):
    user_dir = root / name
    user_dir.mkdir(parents=True)
    if profile is not False:
        profile = profile or {"user_id": name, "persona": "comedies", "attributes": {"a": 1}}
        (user_dir / "profile.json").write_text(json.dumps(profile))
    if lines is not None:
        (user_dir / "data.jsonl").write_text("\n".join(lines) + "\n")
    return user_dir


def test_loads_text_and_prompt_response_records(tmp_path):
    user_dir = make_user_dir(tmp_path, lines=[
        '{"text": "Good morrow."}', "", '{"prompt": "Q?", "response": "A."}'])

    user = load_user(user_dir)

    assert user.profile == Profile("u1", "comedies", {"a": 1})
    assert user.train == (Record("Good morrow."), Record("A.", prompt="Q?"))
    assert user.test == ()


def test_malformed_line_names_file_and_line(tmp_path):
    user_dir = make_user_dir(tmp_path, lines=['{"text": "ok"}', '{"text": "broken'])

    with pytest.raises(DataFormatError, match=r"data\.jsonl:2: malformed JSON"):
        load_user(user_dir)


@pytest.mark.parametrize("line, message", [
    ('{"txt": "x"}', "needs 'text', or 'prompt' and 'response'"),
    ('{"prompt": "q"}', "missing or empty 'response'"),
    ('{"response": "r"}', "missing or non-string 'prompt'"),
    ('{"text": ""}', "'text' must be a non-empty string"),
    ('{"text": "a", "extra": 1}', "extra: extra"),
    ('["text"]', "must be a JSON object"),
])
def test_bad_records_are_named(tmp_path, line, message):
    user_dir = make_user_dir(tmp_path, lines=['{"text": "fine"}', line])

    with pytest.raises(DataFormatError) as err:
        load_user(user_dir)

    assert ":2:" in str(err.value) and message in str(err.value)


def test_missing_profile_is_an_error(tmp_path):
    user_dir = make_user_dir(tmp_path, profile=False, lines=['{"text": "x"}'])

    with pytest.raises(DataFormatError, match="profile.json: missing"):
        load_user(user_dir)


@pytest.mark.parametrize("profile, message", [
    ({"persona": "x"}, "'user_id'"),
    ({"user_id": "bad id/with slash"}, "'user_id'"),
    ({"user_id": "ok", "persona": 3}, "'persona'"),
    ({"user_id": "ok", "attributes": []}, "'attributes'"),
])
def test_bad_profiles_are_named(tmp_path, profile, message):
    user_dir = make_user_dir(tmp_path, profile=profile, lines=['{"text": "x"}'])

    with pytest.raises(DataFormatError, match=message):
        load_user(user_dir)


def test_empty_user_is_an_error_unless_allowed(tmp_path):
    user_dir = make_user_dir(tmp_path, lines=[""])

    with pytest.raises(DataFormatError, match="no records"):
        load_user(user_dir)
    assert load_user(user_dir, allow_empty=True).train == ()


def test_missing_user_dir_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_user(tmp_path / "nobody")


def _users(n=2):
    return [(ROLE_TRAIN, UserData(Profile(f"user{i}", "p"), (Record(f"line {i}"),),
                                  (Record("test"),))) for i in range(n)]


def test_population_round_trip(tmp_path):
    out = tmp_path / "pop"

    population = write_population(out, _users(), {"personas": ["p"]})

    assert [u.user_id for u in population.users] == ["user0", "user1"]
    assert load_population(out).users == population.users
    assert load_user(population.user_dir("user1")).train == (Record("line 1"),)
    assert load_user(population.user_dir("user1")).test == (Record("test"),)


def test_failed_write_leaves_nothing_behind(tmp_path):
    out = tmp_path / "pop"

    def failing():
        yield from _users(1)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_population(out, failing(), {})

    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_population_is_kept_without_force(tmp_path):
    out = tmp_path / "pop"
    write_population(out, _users(1), {})

    with pytest.raises(FileExistsError, match="--force"):
        write_population(out, _users(2), {})
    assert len(load_population(out).users) == 1

    write_population(out, _users(2), {}, force=True)
    assert len(load_population(out).users) == 2


def test_missing_population_manifest_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="population.json: missing"):
        load_population(tmp_path)
