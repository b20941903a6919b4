"""Property-based fuzzing of the input surfaces a user or a client controls.

Each property draws arbitrary input and holds the code to its documented failure:
a valid result, or the module's own one-line error, never another exception.

============================  =================================  ===========================
surface                       property                           inputs (max_examples)
============================  =================================  ===========================
config mapping                RunConfig or ConfigError           FUZZ_EXAMPLES_CONFIG = 300
``key=value`` overrides       resolve_config: same               FUZZ_EXAMPLES_OVERRIDES = 200
``fedpersona simulate``       exit 1 + one stderr line            FUZZ_EXAMPLES_CLI = 100
user directory                UserData or DataFormatError,        FUZZ_EXAMPLES_USER_DIR = 200
                              no file touched
user round trip               write_user -> load_user identity    FUZZ_EXAMPLES_USER_ROUNDTRIP = 100
population manifest           Population or DataFormatError       FUZZ_EXAMPLES_POPULATION = 150
update spec                   check_spec: None or UpdateRejected  FUZZ_EXAMPLES_SPEC = 200
update values                 check_values: exact norm or         FUZZ_EXAMPLES_VALUES = 200
                              UpdateRejected
training reply                parse_reply: finite, expected       FUZZ_EXAMPLES_REPLY = 300
                              shapes, or UpdateRejected
atomic JSON write             old bytes kept, no temp file        FUZZ_EXAMPLES_ATOMIC = 100
============================  =================================  ===========================

1,850 generated inputs in all per run (FUZZ_EXAMPLES_TOTAL; Hypothesis may stop a
property early once it has exhausted a small input space), plus 11 fixed
``@example`` regressions for the bugs these properties found. Sized for a loaded
2-core machine: 12-26 s for the file there, no Hypothesis database.

Each layer of a generated input is mostly valid (``_mostly``) so the checks behind
it are reached: about 20% of the fuzzed replies are accepted, 25% of the config
mappings and 10-25% of the user directories and manifests load.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import tempfile
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from helpers import instruction
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.checkpoint import ServerState
from server.strategy import parse_reply
from shared.config import ConfigError, RunConfig
from shared.data.userdata import (
    DATA_FILE,
    MANIFEST_FILE,
    PROFILE_FILE,
    ROLES,
    TEST_FILE,
    DataFormatError,
    Profile,
    Record,
    UserData,
    load_population,
    load_user,
    write_user,
)
from shared.protocol.validation import UpdateRejected, check_spec, check_values
from shared.protocol.wire import KEY_GLOBAL, KEY_METRICS, KEY_PERSONA
from shared.util import atomic
from simulations import cli
from simulations.run.simulate import resolve_config

FUZZ_EXAMPLES_CONFIG = 300
FUZZ_EXAMPLES_OVERRIDES = 200
FUZZ_EXAMPLES_CLI = 100
FUZZ_EXAMPLES_USER_DIR = 200
FUZZ_EXAMPLES_USER_ROUNDTRIP = 100
FUZZ_EXAMPLES_POPULATION = 150
FUZZ_EXAMPLES_SPEC = 200
FUZZ_EXAMPLES_VALUES = 200
FUZZ_EXAMPLES_REPLY = 300
FUZZ_EXAMPLES_ATOMIC = 100
FUZZ_EXAMPLES_TOTAL = sum(v for k, v in dict(globals()).items()
                          if k.startswith("FUZZ_EXAMPLES_"))


def _one_line(message: str) -> bool:
    return bool(message.strip()) and len(message.splitlines()) == 1


def _mostly(good, bad, *, odds: int = 4):
    """``good`` in ``odds - 1`` draws of ``odds``: a layer must mostly pass for the
    layers behind it to be reached at all."""
    return st.integers(0, odds - 1).flatmap(lambda i: bad if i == 1 else good)


def _one_in(draw, n: int) -> bool:
    """True in 1 draw of ``n``; never for Hypothesis's favourite, the simplest draw (0)."""
    return draw(st.integers(0, n - 1)) == 1


# == 1. configuration =======================================================================

FIELDS = {f.name: f.default for f in dataclasses.fields(RunConfig)}
KEBAB = sorted(name.replace("_", "-") for name in FIELDS)

# Values that sit on the edges of what _coerce and __post_init__ handle.
AWKWARD = ("", " ", "nan", "NaN", "inf", "-inf", "1e999", "-1e999", "-0", "0", "-1", "1.5",
           "2.0", "1_000", "0x10", "\u0663", "\uff11", "\u00b2", "true", "TRUE", "yes", "off",
           "none", "discovered:", "discovered:1", "discovered:2", "discovered:\u00b2",
           "discovered:\u0663", "discovered:" + "9" * 5000, "9" * 5000, "a\nb", "\u2028",
           "\x00", "~", "~nosuchuser-fedpersona/x", "genre,genre", "a,a", ",", "ffa", "fedadam",
           "cuda", "bfloat16", "float16", "ghost")
scalars = st.one_of(
    st.sampled_from(AWKWARD), st.text(max_size=12), st.booleans(), st.none(),
    st.integers(), st.integers(min_value=-2**80, max_value=2**80).map(lambda i: i * 10**40),
    st.floats(), st.lists(st.integers(), max_size=2), st.binary(max_size=4))
setting_names = st.one_of(st.sampled_from(KEBAB), st.sampled_from(sorted(FIELDS)),
                          st.sampled_from(KEBAB), st.text(max_size=12))


@st.composite
def setting_maps(draw) -> dict:
    """Mostly known keys, each with its default (so valid configs occur) or an odd value."""
    out = {}
    for _ in range(draw(st.integers(0, 6))):
        key = draw(setting_names)
        default = FIELDS.get(key.replace("-", "_"), dataclasses.MISSING)
        out[key] = draw(scalars if default is dataclasses.MISSING else
                        _mostly(st.sampled_from([default, str(default)]), scalars))
    return out


def _assert_names_a_key(err: ConfigError, keys) -> None:
    message = str(err)
    assert _one_line(message), message
    if message.startswith("unknown setting "):
        unknown = [k for k in keys if k.replace("-", "_") not in FIELDS]
        assert any(message.startswith(f"unknown setting {k!r}") for k in unknown), message
    else:
        names = {n for k in keys for n in (k, k.replace("_", "-"))}
        assert any(n in message for n in names), message


@settings(max_examples=FUZZ_EXAMPLES_CONFIG, deadline=None)
@given(values=setting_maps())
@example(values={"personas": "discovered:\u00b2"})
@example(values={"personas": "discovered:" + "9" * 5000})
def test_from_mapping_gives_a_config_or_a_one_line_config_error(values):
    try:
        cfg = RunConfig.from_mapping(values)
    except ConfigError as err:
        event("ConfigError")
        _assert_names_a_key(err, values)
    else:  # what Flower hands back must rebuild the same config
        event("valid RunConfig")
        assert RunConfig.from_mapping(cfg.to_flower()) == cfg


def _pair(key: str, value) -> str:
    return f"{key}={value}"


defaults = st.sampled_from(KEBAB).map(lambda k: _pair(k, FIELDS[k.replace("-", "_")]))
override_strings = _mostly(defaults, st.one_of(
    st.builds(_pair, st.sampled_from(KEBAB), st.one_of(st.sampled_from(AWKWARD),
                                                       st.text(max_size=12),
                                                       st.integers().map(str),
                                                       st.floats().map(repr))),
    st.builds(_pair, st.text(max_size=8), st.text(max_size=8)),
    st.text(max_size=16)), odds=3)


@settings(max_examples=FUZZ_EXAMPLES_OVERRIDES, deadline=None)
@given(pairs=st.lists(override_strings, max_size=5))
def test_resolve_config_gives_a_config_or_a_one_line_config_error(pairs):
    try:
        cfg = resolve_config(None, pairs)
    except ConfigError as err:
        keys = [p.partition("=")[0].strip() for p in pairs]
        if str(err).startswith("setting "):  # not of the form key=value: names the pair
            assert _one_line(str(err)) and any(repr(p) in str(err) for p in pairs), err
        else:
            _assert_names_a_key(err, keys)
    else:
        assert isinstance(cfg, RunConfig)


class _Accepted(Exception):
    """Raised in place of the simulation: the CLI accepted the settings."""


# argparse owns arguments that start with "-" (its usage error is its own two lines).
cli_settings = st.lists(override_strings.filter(lambda s: not s.startswith("-")), max_size=4)


@settings(max_examples=FUZZ_EXAMPLES_CLI, deadline=None)
@given(pairs=cli_settings)
@example(pairs=["run-dir=~nosuchuser-fedpersona/x"])
def test_cli_simulate_answers_bad_settings_with_one_stderr_line(pairs):
    # Arrange
    try:
        resolved: RunConfig | ConfigError = resolve_config(None, pairs)
    except ConfigError as err:
        resolved = err
    stderr, stdout = io.StringIO(), io.StringIO()

    # Act: the simulation itself is replaced; only the settings path runs
    with mock.patch("simulations.run.simulate.simulate", side_effect=_Accepted), \
            redirect_stderr(stderr), redirect_stdout(stdout):
        try:
            code = cli.main(["simulate", *pairs])
        except _Accepted:
            code = None
    event("accepted" if code is None else "refused")

    # Assert
    errors = stderr.getvalue()
    assert "Traceback" not in errors
    if isinstance(resolved, ConfigError):
        assert code == 1 and errors == f"fedpersona: error: {resolved}\n"
    elif code is not None:  # accepted by the config, refused before the simulation
        assert code == 1 and errors.startswith("fedpersona: error: ") and _one_line(errors)
    else:
        assert errors == ""


# == 2. on-device data =======================================================================

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)


BAD_IDS = st.one_of(st.sampled_from(["", "../x", "a b", "-a", "u1\n", "x" * 200]), json_values)
profiles = st.fixed_dictionaries(
    {"user_id": _mostly(st.just("u1"), BAD_IDS, odds=5),
     "persona": _mostly(st.sampled_from(["comedies", None]), json_values, odds=5),
     "attributes": _mostly(st.just({"genre": "comedies"}), json_values, odds=5)},
    optional={"extra": json_values})
good_records = st.one_of(st.fixed_dictionaries({"text": st.text(min_size=1, max_size=8)}),
                         st.fixed_dictionaries({"prompt": st.text(max_size=8),
                                                "response": st.text(min_size=1, max_size=8)}))
records = _mostly(good_records, st.one_of(
    st.fixed_dictionaries({}, optional={"text": st.one_of(st.text(max_size=8), json_values),
                                        "prompt": st.one_of(st.text(max_size=8), json_values),
                                        "response": st.one_of(st.text(max_size=8), json_values),
                                        "a\nb": json_values}),
    json_values))

# Byte strings the json module chokes on in ways other than JSONDecodeError.
HOSTILE = (b"[" * 100_000, b'{"user_id": "u1", "attributes": {"n": ' + b"1" * 5000 + b"}}",
           b'{"text": ' + b"1" * 5000 + b"}", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"\x00",
           "{\"text\": \"a\u2028b\"}".encode())
broken_files = st.one_of(st.none(), st.just("dir"), st.sampled_from(HOSTILE),
                         st.binary(max_size=40),
                         st.builds(lambda v: json.dumps(v).encode(), json_values))


def _dump(obj, ascii_only: bool) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only)


profile_files = _mostly(st.builds(_dump, profiles, st.booleans()).map(str.encode), broken_files)
record_files = _mostly(
    st.lists(_mostly(st.builds(_dump, records, st.booleans()), st.sampled_from(["", " ", "{"]),
                     odds=8), max_size=4).map(lambda lines: "\n".join(lines).encode()),
    broken_files)


def _good_user_id(user_id: str) -> bool:
    """The documented user id, checked independently of USER_ID_PATTERN."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", user_id) is not None


def _put(path: Path, content) -> None:
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)


def _snapshot(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        out[str(path.relative_to(root))] = (path.is_dir(), stat.st_mtime_ns, stat.st_mode,
                                            None if path.is_dir() else path.read_bytes())
    return out


@settings(max_examples=FUZZ_EXAMPLES_USER_DIR, deadline=None)
@given(profile=profile_files, data=record_files, test=record_files, allow_empty=st.booleans())
def test_load_user_gives_user_data_or_a_data_format_error_naming_the_file(profile, data, test,
                                                                         allow_empty):
    with tempfile.TemporaryDirectory() as tmp:
        # Arrange
        user_dir = Path(tmp) / "u1"
        user_dir.mkdir()
        _put(user_dir / PROFILE_FILE, profile)
        _put(user_dir / DATA_FILE, data)
        _put(user_dir / TEST_FILE, test)
        before = _snapshot(Path(tmp))

        # Act
        try:
            user = load_user(user_dir, allow_empty=allow_empty)
            event("loaded")
        except DataFormatError as err:
            event("DataFormatError")
            # Assert: one line that starts with the offending file (and line)
            message = str(err)
            assert _one_line(message), message
            named = re.match(r"^(.*?)(:\d+)?: ", message)
            assert named and named.group(1) in {
                str(user_dir / n) for n in (PROFILE_FILE, DATA_FILE, TEST_FILE)}, message
        else:
            assert _good_user_id(user.profile.user_id)
            assert user.train or allow_empty
            assert all(r.response.strip() and isinstance(r.prompt, str)
                       for r in user.train + user.test)
        assert _snapshot(Path(tmp)) == before  # reading never writes


user_texts = st.text(min_size=1, max_size=20).filter(str.strip)
user_records = st.builds(Record, response=user_texts,
                         prompt=st.one_of(st.just(""), st.text(max_size=10)))


@settings(max_examples=FUZZ_EXAMPLES_USER_ROUNDTRIP, deadline=None)
@given(train=st.lists(user_records, min_size=1, max_size=4),
       test=st.lists(user_records, max_size=3),
       persona=st.one_of(st.none(), user_texts),
       attributes=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
@example(train=[Record("a\u2028b")], test=[], persona=None, attributes={})
def test_a_written_user_loads_back_unchanged(train, test, persona, attributes):
    data = UserData(Profile("u1", persona, attributes), tuple(train), tuple(test))
    with tempfile.TemporaryDirectory() as tmp:
        write_user(Path(tmp) / "u1", data)

        assert load_user(Path(tmp) / "u1") == data


population_entries = st.fixed_dictionaries(
    {"user_id": _mostly(st.sampled_from(["u1", "u2", "Ariel.the-tempest"]), st.one_of(
        st.sampled_from(["", "..", "../../etc", "a/b", "/x", "u1\n"]), json_values), odds=6),
     "role": _mostly(st.sampled_from(ROLES), json_values, odds=6),
     "persona": _mostly(st.sampled_from(["comedies", None]), json_values, odds=6),
     "num_train": _mostly(st.integers(0, 5), json_values, odds=6),
     "num_test": _mostly(st.integers(0, 5), json_values, odds=6)},
    optional={"attributes": _mostly(st.just({}), json_values), "extra": json_values})
manifests = _mostly(
    st.fixed_dictionaries({"users": _mostly(st.lists(population_entries, max_size=3),
                                            json_values)},
                          optional={"meta": _mostly(st.just({"personas": ["comedies"]}),
                                                    json_values)}),
    json_values).map(json.dumps).map(str.encode)


@settings(max_examples=FUZZ_EXAMPLES_POPULATION, deadline=None)
@given(manifest=_mostly(manifests, st.one_of(st.sampled_from(HOSTILE), st.binary(max_size=40),
                                             st.none())))
@example(manifest=json.dumps({"users": [{"user_id": "../../etc", "role": "train", "persona": None,
                                         "num_train": 1, "num_test": 0}]}).encode())
def test_load_population_gives_a_population_or_a_data_format_error(manifest):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pop"
        root.mkdir()
        _put(root / MANIFEST_FILE, manifest)
        before = _snapshot(Path(tmp))

        try:
            population = load_population(root)
            event("loaded")
        except DataFormatError as err:
            event("DataFormatError")
            assert _one_line(str(err)) and str(err).startswith(f"{root / MANIFEST_FILE}: "), err
        else:
            for user in population.users:  # every user lies inside the population
                assert population.user_dir(user.user_id).parent == root / "users"
                assert _good_user_id(user.user_id) and user.role in ROLES
                assert type(user.num_train) is int and type(user.num_test) is int
            assert isinstance(population.personas, tuple)
        assert _snapshot(Path(tmp)) == before


# == 3. update validation =====================================================================

B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
B2_KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
EXPECTED = {B_KEY: (4, 2), B2_KEY: (3, 2)}
DTYPES = ("float32", "float32", "float16", "float64", "int64", "int32", "bool", "uint8", ">f4")

shapes = st.one_of(st.sampled_from(sorted(EXPECTED.values())),
                   hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))


@st.composite
def ndarrays(draw, shape=None) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    return draw(hnp.arrays(dtype, shape if shape is not None else draw(shapes)))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _huge_npy(dtype: str = "<f4") -> bytes:
    """A valid ``.npy`` header declaring 10**12 elements, followed by 8 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": (10**12,)})
    return buffer.getvalue() + bytes(8)


@st.composite
def arrays(draw, key: str) -> Array:
    """Mostly right at each layer (so the deeper checks are reached), sometimes wrong:
    an honest Array of any dtype and shape, or one whose header lies about its data."""
    shape = draw(shapes) if _one_in(draw, 8) else EXPECTED.get(key, (2, 2))
    dtype = draw(st.sampled_from(DTYPES)) if _one_in(draw, 5) else "float32"
    finite = dtype == "float32" and not _one_in(draw, 4)  # NaN/Inf still in 1 of 4
    honest = draw(hnp.arrays(np.dtype(dtype), shape, elements=st.floats(
        width=32, allow_nan=False, allow_infinity=False) if finite else None))
    if not _one_in(draw, 5):
        return Array(honest)
    # Forged: the header mostly claims the one spec check_spec accepts; the data differ.
    claimed_dtype = draw(st.sampled_from(DTYPES)) if _one_in(draw, 2) else "float32"
    claimed_shape = draw(shapes) if _one_in(draw, 2) else EXPECTED.get(key, shape)
    data = draw(st.one_of(
        ndarrays().map(_npy), st.just(_npy(honest)).map(lambda b: b[:len(b) - 1]),
        st.just(_npy(honest.astype(np.float64))), st.just(_huge_npy()), st.binary(max_size=64)))
    stype = draw(st.sampled_from(["torch", ""])) if _one_in(draw, 4) else "numpy.ndarray"
    return Array(claimed_dtype, tuple(claimed_shape), stype, data)


@st.composite
def array_records(draw) -> ArrayRecord:
    keys = list(EXPECTED)
    if _one_in(draw, 6):  # now and then: missing, extra or odd keys
        keys = draw(st.lists(st.one_of(st.sampled_from([B_KEY, B2_KEY, A_KEY]),
                                       st.text(max_size=6)), max_size=4, unique=True))
    return ArrayRecord({key: draw(arrays(key)) for key in keys})


metric_values = st.one_of(st.integers(-3, 10), st.sampled_from([2**70, 0, 1]), st.floats(),
                          st.lists(st.integers(0, 2), max_size=2),
                          st.lists(st.floats(), min_size=1, max_size=2))


@st.composite
def replies(draw) -> tuple[Message, str | None]:
    """A training reply and the persona the server expects it from."""
    persona = draw(st.sampled_from([None, "a"]))
    request = instruction(RecordDict(), MessageType.TRAIN)
    if _one_in(draw, 20):
        return Message(Error(code=0, reason=draw(st.text(max_size=10))),
                       reply_to=request), persona
    names = [KEY_GLOBAL] + ([KEY_PERSONA] if persona else [])
    if _one_in(draw, 5):
        names = draw(st.sampled_from([[KEY_GLOBAL], [KEY_GLOBAL, KEY_PERSONA], [KEY_PERSONA],
                                      []]))
        names += draw(st.lists(st.text(max_size=6), max_size=1))
    content = RecordDict({name: draw(array_records()) for name in names})
    kind = draw(st.integers(0, 11))
    if kind == 1:  # a metrics record of the wrong kind (strings are not metric values)
        content[KEY_METRICS] = ConfigRecord({"num-examples": draw(st.text(max_size=4))})
    elif kind == 2:
        content[KEY_METRICS] = MetricRecord(draw(st.fixed_dictionaries({}, optional={
            "num-examples": metric_values, "declined": metric_values,
            "epsilon": metric_values})))
    elif kind != 3:  # kind 3: no metrics record at all
        content[KEY_METRICS] = MetricRecord({"num-examples": draw(st.integers(1, 50)),
                                             "declined": 0, "epsilon": 1.5})
    return Message(content, reply_to=request), persona


def _server_state() -> ServerState:
    sent = {key: torch.zeros(shape) for key, shape in EXPECTED.items()}
    return ServerState(round=1, global_state={**sent, A_KEY: torch.ones(2, 2)},
                       persona_states={"a": dict(sent)})


def _reply_of(global_arrays: dict[str, Array], declined=0) -> tuple[Message, None]:
    content = RecordDict({KEY_GLOBAL: ArrayRecord(global_arrays),
                          KEY_METRICS: MetricRecord({"num-examples": 3, "declined": declined})})
    return Message(content, reply_to=instruction(RecordDict(), MessageType.TRAIN)), None


_RIGHT = {k: Array(np.zeros(s, np.float32)) for k, s in EXPECTED.items()}
# Found by this property before the fix (see the report): a header that lies about its data
# (accepted with shape (3, 2) where (4, 2) was expected), bytes that are no .npy (np.load's
# ValueError/EOFError escaped), a .npy header declaring 10**12 elements, and NaN or a list
# as the declined flag (int() raised).
_FORGED = [
    {**_RIGHT, B_KEY: Array("float32", (4, 2), "numpy.ndarray",
                            _npy(np.zeros((3, 2), np.float32)))},
    {**_RIGHT, B_KEY: Array("float32", (4, 2), "numpy.ndarray", b"\x00")},
    {**_RIGHT, B_KEY: Array("float32", (4, 2), "numpy.ndarray", _huge_npy())},
]


@settings(max_examples=FUZZ_EXAMPLES_REPLY, deadline=None)
@given(drawn=replies(), with_current=st.booleans(), bound=st.sampled_from([0.0, 10.0, 1e30]))
@example(drawn=_reply_of(_FORGED[0]), with_current=True, bound=0.0)
@example(drawn=_reply_of(_FORGED[1]), with_current=False, bound=0.0)
@example(drawn=_reply_of(_FORGED[2]), with_current=False, bound=0.0)
@example(drawn=_reply_of(_RIGHT, declined=math.nan), with_current=False, bound=0.0)
@example(drawn=_reply_of(_RIGHT, declined=[1]), with_current=False, bound=0.0)
def test_parse_reply_accepts_only_finite_expected_tensors_or_rejects(drawn, with_current, bound):
    reply, persona = drawn
    try:
        update, metrics = parse_reply(reply, persona=persona, expected=EXPECTED,
                                      current=_server_state() if with_current else None,
                                      max_update_norm=bound)
    except UpdateRejected as err:
        event(f"rejected: {str(err).split(':')[0][:30]}")
        assert _one_line(str(err)) or str(err).startswith("client error: "), err
        return
    if update is None:  # declined: nothing to aggregate
        event("declined")
        assert metrics["declined"] == 1
        return
    event("accepted")
    states = [update.global_state] + ([update.persona_state] if persona else [])
    assert update.persona_state == {} or persona
    for state in states:
        assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    assert type(update.num_examples) is int and update.num_examples > 0
    assert math.isfinite(metrics["update-norm"]) or not bound
    assert not bound or metrics["update-norm"] <= bound


specs = st.dictionaries(
    st.one_of(st.sampled_from(sorted(EXPECTED)), st.text(max_size=6)),
    st.tuples(st.one_of(st.sampled_from(DTYPES), st.text(max_size=6)),
              st.one_of(shapes, st.lists(st.integers(), max_size=3).map(tuple))),
    max_size=4)


@settings(max_examples=FUZZ_EXAMPLES_SPEC, deadline=None)
@given(spec=specs)
def test_check_spec_accepts_only_the_expected_spec(spec):
    try:
        check_spec(spec, EXPECTED, what="global adapter")
    except UpdateRejected as err:
        assert _one_line(str(err)) and str(err).startswith("global adapter: ")
    else:
        assert {k: (d, tuple(s)) for k, (d, s) in spec.items()} == {
            k: ("float32", s) for k, s in EXPECTED.items()}




def _float_states(*, finite: bool):
    """Float16/32/64 tensors of the expected shapes; the server's own reference is finite."""
    def states(dtype):
        elements = (st.floats(allow_nan=False, allow_infinity=False,
                              width=np.dtype(dtype).itemsize * 8) if finite else None)
        return st.fixed_dictionaries({k: hnp.arrays(dtype, s, elements=elements)
                                      for k, s in EXPECTED.items()})
    return st.sampled_from([np.float16, np.float32, np.float64]).flatmap(states)


@settings(max_examples=FUZZ_EXAMPLES_VALUES, deadline=None)
@given(state=_float_states(finite=False),
       reference=st.one_of(st.none(), _float_states(finite=True)),
       bound=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e300)))
@example(state={k: np.full(s, 3e38, np.float32) for k, s in EXPECTED.items()},
         reference={k: np.full(s, -3e38, np.float32) for k, s in EXPECTED.items()}, bound=1e300)
def test_check_values_returns_the_exact_norm_or_rejects(state, reference, bound):
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    refs = None if reference is None else {k: torch.from_numpy(v) for k, v in reference.items()}
    finite = all(np.isfinite(v.astype(np.float64)).all() for v in state.values())
    delta = {k: v.astype(np.float64) - (0.0 if reference is None else reference[k])
             for k, v in state.items()}
    with np.errstate(over="ignore"):  # float64 inputs near their max: the norm is inf
        squares = sum(float((d ** 2).sum()) for d in delta.values())
    norm = math.sqrt(squares) if finite else math.nan

    try:
        got = check_values(tensors, what="persona a adapter", reference=refs,
                           max_delta_norm=bound)
    except UpdateRejected as err:
        assert _one_line(str(err)) and str(err).startswith("persona a adapter: ")
        assert not finite or (bound is not None and not norm <= bound), err
    else:
        assert finite and math.isclose(got, norm, rel_tol=1e-9)
        assert bound is None or got <= bound


# == 4. atomic writes ==========================================================================

class _Circular(list):
    pass


def _circular() -> list:
    loop = _Circular()
    loop.append(loop)
    return loop


writable = st.one_of(json_values, st.dictionaries(st.text(max_size=4), json_values, max_size=3))
unwritable = st.one_of(st.just("\ud800"), st.builds(_circular),
                       st.just({(1, 2): "tuple key"}), st.just({1: "a", "b": 2}))


@settings(max_examples=FUZZ_EXAMPLES_ATOMIC, deadline=None)
@given(old=st.binary(max_size=40), obj=st.one_of(writable, unwritable),
       fault=st.sampled_from([None, "replace", "fsync"]))
def test_a_failed_atomic_write_keeps_the_old_bytes_and_leaves_no_temp_file(old, obj, fault):
    with tempfile.TemporaryDirectory() as tmp:
        # Arrange
        path = Path(tmp) / "state.json"
        path.write_bytes(old)
        patch = (mock.patch.object(atomic.os, fault, side_effect=OSError("disk gone"))
                 if fault else nullcontext())

        # Act
        with patch:
            try:
                atomic.write_json_atomic(path, obj)
                failed = False
            except (OSError, ValueError, TypeError, RecursionError):
                failed = True

        # Assert
        assert os.listdir(tmp) == ["state.json"]  # no temp file, whatever happened
        if failed:
            assert path.read_bytes() == old
        else:
            assert fault is None
            assert json.loads(path.read_text(encoding="utf-8")) == json.loads(
                json.dumps(atomic.json_safe(obj), default=str))
