"""`fedpersona data import`: your own users as a population (shared.data.importer)."""

from __future__ import annotations

import json

import pytest

from shared.data.importer import ImportSettings, import_population, read_persona_map
from shared.data.userdata import DataFormatError, load_population, load_user
from simulations.cli import main


def _folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "ada.txt").write_text("one\ntwo\n\nthree\nfour\nfive\n")
    (folder / "bob.jsonl").write_text(
        '{"text": "hi", "persona": "engineers"}\n'
        '{"prompt": "Q?", "response": "A.", "persona": "engineers"}\n\n'
        '{"text": "third"}\n')
    (folder / "cy.txt").write_text("alone\n")
    return folder


def test_a_folder_of_user_files_becomes_a_population(tmp_path):
    population = import_population(_folder(tmp_path), tmp_path / "pop", ImportSettings())

    again = load_population(tmp_path / "pop")
    assert [u.user_id for u in again.users] == ["ada", "bob"]
    assert again.meta["skipped_users"] == ["cy"] and again.personas == ("engineers",)
    ada, bob = (load_user(population.user_dir(u)) for u in ("ada", "bob"))
    # the last 20% (at least one) of each user's records, in order, held out
    assert [r.response for r in ada.train] == ["one", "two", "three", "four"]
    assert [r.response for r in ada.test] == ["five"]
    assert ada.profile.persona is None and bob.profile.persona == "engineers"
    assert bob.train[1].prompt == "Q?" and [r.response for r in bob.test] == ["third"]


def test_one_jsonl_file_with_a_user_field_and_a_persona_map(tmp_path):
    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps({"who": u, "text": f"{u} line {i}"}) + "\n"
                              for i in range(5) for u in ("x1", "x2")))
    (tmp_path / "personas.csv").write_text("x1,poets\nx2,clerks\n")

    population = import_population(
        source, tmp_path / "pop", ImportSettings(user_field="who", test_fraction=0.4),
        personas=read_persona_map(tmp_path / "personas.csv"))

    x1 = load_user(population.user_dir("x1"))
    assert x1.profile.persona == "poets" and population.personas == ("clerks", "poets")
    assert [r.response for r in x1.test] == ["x1 line 3", "x1 line 4"]


@pytest.mark.parametrize("content, message", [
    ('{"user": "a", "text": "ok"}\nnot json\n', "all.jsonl:2: not JSON"),
    ('{"text": "no user"}\n', "all.jsonl:1: no 'user' field naming the user"),
    ('{"user": "a", "text": "x", "persona": "p"}\n{"user": "a", "text": "y", "persona": "q"}\n',
     "user a names 2 personas"),
    ('{"user": "../etc", "text": "x"}\n{"user": "a", "txt": "y"}\n',
     "all.jsonl:2: a record needs 'text'"),
    ('{"user": "a", "text": "only one"}\n', "no user has 2 records or more"),
])
def test_bad_input_names_the_problem_and_writes_nothing(tmp_path, content, message):
    (tmp_path / "all.jsonl").write_text(content)

    with pytest.raises(DataFormatError, match=message):
        import_population(tmp_path / "all.jsonl", tmp_path / "pop", ImportSettings())

    assert not (tmp_path / "pop").exists()


def test_a_persona_map_naming_unknown_users_is_refused(tmp_path):
    (tmp_path / "map.json").write_text('{"ada": "a", "nobody": "b"}')

    with pytest.raises(DataFormatError, match="personas name users the source lacks: nobody"):
        import_population(_folder(tmp_path), tmp_path / "pop", ImportSettings(),
                          personas=read_persona_map(tmp_path / "map.json"))


def test_the_command_writes_the_population_and_says_who_was_left_out(tmp_path, capsys):
    code = main(["data", "import", str(_folder(tmp_path)), "--out", str(tmp_path / "pop"),
                 "--tokenizer", "tiny"])

    out = capsys.readouterr().out
    assert code == 0
    assert "left out (fewer than 2 records): cy" in out and "wrote 2 users" in out
    assert "cold-start" not in out  # the summary names only what the data has
    assert main(["data", "import", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "p2")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.integration
def test_an_imported_population_runs_and_reports_without_empty_tables(tmp_path):
    from shared.config import RunConfig
    from simulations.run.simulate import simulate

    folder = tmp_path / "mine"
    folder.mkdir()
    for user, persona in (("ann", "a"), ("ben", "a"), ("col", "b")):
        (folder / f"{user}.jsonl").write_text("".join(
            json.dumps({"text": f"{user} says thing {i} to the room", "persona": persona})
            + "\n" for i in range(10)))
    import_population(folder, tmp_path / "pop", ImportSettings())
    cfg = RunConfig(model="tiny", data_dir=str(tmp_path / "pop"), run_dir=str(tmp_path / "run"),
                    num_rounds=1, clients_per_round=3, seq_len=32, lora_rank=4,
                    lora_alpha=8.0, local_steps=1, user_steps=1, target_epsilon=50.0)

    report = simulate(cfg)

    assert report["levels"]["global+persona+user"]["users"] == 3
    assert "cold_start" not in report and "cold_start_held_out_plays" not in report
    text = (tmp_path / "run" / "report.md").read_text()
    assert "Cold-start" not in text and "nan" not in text.lower()
