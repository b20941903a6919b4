"""Hold a device's wire log (see :mod:`client.mods.wire_log`) to what may leave the device.

Allowed in a reply: for a train reply, the ``global`` and ``persona`` adapter
records, each with exactly the expected tensor names and shapes in a float
dtype, none equal to a tensor of the on-device user adapter; for every reply, a
``metrics`` record whose names are in :data:`shared.protocol.wire.REPLY_METRICS` and whose
values are scalar numbers. Anything else (a config record, which can carry
strings; an integer array, which can carry token ids; a list-valued metric; an
unknown name) is a violation.

Under ``secagg = true`` a round's train messages are the four stages of Flower's
SecAgg+ (``flwr/client/mod/secure_aggregation/secaggplus_mod.py``), and the log says
which (``secagg``). A reply to one may carry Flower's ``secaggplus_configs`` record
with exactly that stage's keys and value types (:data:`SECAGG_REPLY`) and nothing
else: ``setup`` the two public keys (bytes); ``share_keys`` the destination node ids
(ints) and one encrypted share per destination (bytes); ``unmask`` node ids and one
Shamir share per node; each list exactly as long as the server's message fixes, each
bytes value no longer than Flower's format needs (:data:`SECAGG_MAX_BYTES`). In
``collect_masked_vectors`` it carries the masked vector, and beside it the FitRes-style
records Flower's mod builds from our handler's reply: its metrics (the names and
number types of a plain train reply), the example count, the parameters record that
Flower empties, and an OK status with an empty message.

The masked vector is integer arrays, which anywhere else would be a violation: an
integer array in clear can be token ids. Here it may leave because what leaves is not
the client's numbers: each coordinate is the quantized, weighted adapter change plus a
private mask and pairwise masks, all mod 2**32, and the masks are uniform over that
range, so one client's vector alone is uniformly distributed whatever it encodes; the
server can remove the masks only for the sum over the round's clients (Flower's
``pseudo_rand_gen`` seeds them with 32 bits per secret: the strength is Flower's, see
:mod:`server.secagg`). What the audit can still hold it to is its form: ``int64``
arrays (:data:`SECAGG_MASKED_DTYPE`) with no bytes beyond their shape, in exactly the
layout of :mod:`shared.privacy.secagg` (the weight, then the global change and one slot per
persona of the round) when the log names the round's personas, else a bounded size.
The user-adapter comparison cannot see through the masks; what is masked is built
from the released adapters only (:mod:`client.mods.secagg`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from shared.protocol.wire import KEY_METRICS, REPLY_ARRAYS, REPLY_METRICS

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

# Flower's SecAgg+ names (flwr/common/secure_aggregation/secaggplus_constants.py:
# RECORD_KEY_CONFIGS, Key.STAGE, Key.MASKED_PARAMETERS, Stage.all()), repeated to keep
# this module free of Flower; tests/test_wire_audit.py checks that they match.
SECAGG_RECORD = "secaggplus_configs"
SECAGG_STAGE = "stage"
SECAGG_MASKED = "masked_params"
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
# What each stage's reply carries in SECAGG_RECORD: key -> (type, list item type).
SECAGG_REPLY: dict[str, dict[str, tuple[str, str | None]]] = {
    "setup": {"pk1": ("bytes", None), "pk2": ("bytes", None)},
    "share_keys": {"dsts": ("list", "int"), "ctxts": ("list", "bytes")},
    "collect_masked_vectors": {SECAGG_MASKED: ("list", "bytes")},
    "unmask": {"nids": ("list", "int"), "shares": ("list", "bytes")},
}
# Longest bytes value (or list item) a key may carry; Flower 1.42's sizes in brackets.
SECAGG_MAX_BYTES = {
    "pk1": 256, "pk2": 256,  # PEM SubjectPublicKeyInfo of a SECP384R1 key [215]
    "ctxts": 768,  # Fernet token of (source, destination, seed share, key share) [612]
    "shares": 384,  # Shamir: 4-byte index + 16 per 16-byte chunk; seed [52], key [324]
    SECAGG_MASKED: 2**31,  # checked against the array layout instead
}
SECAGG_MASKED_DTYPE = "int64"  # quantized values + masks, mod 2**32, as Flower holds them
SECAGG_MAX_HEADER_BYTES = 256  # np.save pads a header to a multiple of 64 [128]
# Bounds on the masked vector when the log does not give its exact layout.
MAX_PERSONA_SLOTS = 64
MAX_MASKED_ELEMENTS = 2**24
# The FitRes-style records beside the masked vector (flwr.compat recorddict_compat
# fitres_to_recorddict) -> their kind.
FITRES_RECORDS = {"fitres.metrics": "config", "fitres.num_examples": "metrics",
                  "fitres.parameters": "arrays", "fitres.status": "config"}


def check_entries(entries: Sequence[dict], expected: Mapping[str, tuple[int, ...]]
                  ) -> list[str]:
    """Violations in one device's log (empty = clean). ``expected``: tensor name ->
    shape of a released adapter record."""
    problems = []
    for number, entry in enumerate(entries, 1):
        where = f"entry {number}"
        if "unreadable" in entry:
            problems.append(f"{where}: unreadable log line {entry['unreadable']}")
            continue
        kind = str(entry.get("message_type", "")).split(".")[0]
        where = f"entry {number} ({kind}, round {entry.get('server_round')})"
        if kind not in REPLY_METRICS:
            problems.append(f"{where}: unknown message type {entry.get('message_type')!r}")
            continue
        if entry.get("secagg") is not None:
            secagg = entry["secagg"]
            where = (f"entry {number} ({kind}, SecAgg+ {secagg.get('stage')}, "
                     f"round {entry.get('server_round')})")
            if kind != "train":
                problems.append(f"{where}: SecAgg+ runs in train messages, not {kind}")
            problems += [f"{where}: {p}" for p in _check_secagg(
                secagg, entry.get("records", {}), expected, replied=not entry.get("error"))]
            continue
        for name, record in entry.get("records", {}).items():
            problems += [f"{where}: {p}" for p in _check_record(kind, name, record, expected)]
    return problems


def _check_record(kind: str, name: str, record: dict,
                  expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    if record.get("kind") == "metrics" and name == KEY_METRICS:
        return _check_metrics(kind, record.get("values", {}))
    if record.get("kind") == "arrays" and name in REPLY_ARRAYS[kind]:
        return _check_arrays(name, record.get("arrays", {}), expected)
    if record.get("kind") == "config":
        fields = ", ".join(f"{k}: {t}" for k, t in record.get("values", {}).items())
        return [f"record {name!r} is a config record (it can carry strings: {fields})"]
    return [f"record {name!r} of kind {record.get('kind')!r} may not leave in a {kind} reply"]


def _check_metrics(kind: str, values: Mapping[str, object]) -> list[str]:
    problems = []
    for key, value in values.items():
        if key not in REPLY_METRICS[kind]:
            problems.append(f"metric {key!r} is not one a {kind} reply may send")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"metric {key!r} is a {type(value).__name__}, not a scalar number")
        elif isinstance(value, float) and math.isnan(value) and key != "train-loss":
            problems.append(f"metric {key!r} is NaN")
    return problems


def _check_arrays(name: str, arrays: Mapping[str, dict],
                  expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    problems = []
    for key in sorted(set(arrays) - set(expected)):
        problems.append(f"{name}: unexpected tensor {key!r} {arrays[key].get('shape')}")
    for key in sorted(set(expected) - set(arrays)):
        problems.append(f"{name}: tensor {key!r} missing")
    for key, info in arrays.items():
        if key in expected and tuple(info.get("shape", ())) != tuple(expected[key]):
            problems.append(f"{name}: tensor {key!r} has shape {info.get('shape')}, "
                            f"expected {list(expected[key])}")
        if info.get("dtype") not in FLOAT_DTYPES:
            problems.append(f"{name}: tensor {key!r} has dtype {info.get('dtype')} "
                            "(only floats may leave; integers can carry token ids)")
        if info.get("matches_user_adapter"):
            problems.append(f"{name}: tensor {key!r} equals a tensor of the on-device user "
                            "adapter")
    return problems


def _check_secagg(secagg: Mapping[str, object], records: Mapping[str, dict],
                  expected: Mapping[str, tuple[int, ...]], *, replied: bool) -> list[str]:
    """One SecAgg+ stage reply: exactly Flower's record (and, when masking, the FitRes
    records) with exactly the stage's keys, types and sizes."""
    stage = secagg.get("stage")
    if stage not in SECAGG_STAGES:
        return [f"SecAgg+ stage {stage!r} is not one of Flower's {list(SECAGG_STAGES)}"]
    allowed = {SECAGG_RECORD: "config"} | (
        FITRES_RECORDS if stage == "collect_masked_vectors" else {})
    problems = []
    for name in sorted(set(records) - set(allowed)):
        problems.append(f"record {name!r} ({records[name].get('kind')}) may not leave in a "
                        f"SecAgg+ {stage} reply")
    for name, kind in allowed.items():
        record = records.get(name)
        if record is None:
            if replied:
                problems.append(f"record {name!r} missing from a SecAgg+ {stage} reply")
        elif record.get("kind") != kind:
            problems.append(f"record {name!r} is of kind {record.get('kind')!r}, "
                            f"expected {kind}")
        elif name == SECAGG_RECORD:
            problems += _check_secagg_configs(stage, secagg, _details(record), expected)
        else:
            problems += _check_fitres(name, record)
    return problems


def _check_secagg_configs(stage: str, secagg: Mapping[str, object],
                          details: Mapping[str, dict],
                          expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    name = SECAGG_RECORD
    spec = SECAGG_REPLY[stage]
    problems = _check_fields(name, details, spec)
    lists = [key for key, (kind, _) in spec.items()
             if kind == "list" and details.get(key, {}).get("type") == "list"]
    if stage in ("share_keys", "unmask"):
        # each list names or serves every other peer (share_keys) or every node the
        # server asked about (unmask): its length is the server's, not the client's
        sent = secagg.get("peers" if stage == "share_keys" else "nodes")
        if not isinstance(sent, int) or isinstance(sent, bool):
            problems.append(f"{name}: the log does not say how many nodes the server's "
                            f"{stage} message named")
        else:
            want = sent - 1 if stage == "share_keys" else sent
            problems += [f"{name}: {key!r} has {details[key].get('len')} items, expected "
                         f"{want}" for key in lists if details[key].get("len") != want]
    if stage == "collect_masked_vectors" and SECAGG_MASKED in lists:
        problems += _check_masked(details[SECAGG_MASKED], secagg.get("persona_slots"),
                                  expected)
    return problems


def _check_fields(name: str, details: Mapping[str, dict],
                  spec: Mapping[str, tuple[str, str | None]]) -> list[str]:
    problems = []
    for key in sorted(set(details) - set(spec)):
        problems.append(f"{name}: unexpected key {key!r} ({details[key].get('type')})")
    for key in sorted(set(spec) - set(details)):
        problems.append(f"{name}: key {key!r} missing")
    for key, (kind, item) in spec.items():
        info = details.get(key)
        if info is None:
            continue
        if info.get("type") != kind:
            problems.append(f"{name}: {key!r} is a {info.get('type')}, expected "
                            f"{kind}{f' of {item}' if item else ''}")
            continue
        items = info.get("items", [])
        if item is not None and any(t != item for t in items):
            problems.append(f"{name}: {key!r} holds {', '.join(items)}, expected only {item}")
        longest = info.get("max_item_len" if kind == "list" else "len")
        bound = SECAGG_MAX_BYTES.get(key)
        if bound is not None and (not isinstance(longest, int) or longest > bound):
            problems.append(f"{name}: {key!r} carries a value of {longest} bytes, at most "
                            f"{bound} allowed")
    return problems


def _check_masked(info: Mapping[str, object], slots: object,
                  expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    where = f"{SECAGG_RECORD}: {SECAGG_MASKED!r}"
    arrays = info.get("arrays")
    if not isinstance(arrays, list):
        return [f"{where}: the log does not describe the masked arrays"]
    problems, total = [], 0
    for index, array in enumerate(arrays):
        if not isinstance(array, dict):
            problems.append(f"{where}: item {index} is not a numpy array")
            continue
        count = math.prod(array.get("shape", []))
        total += count
        if array.get("dtype") != SECAGG_MASKED_DTYPE:
            problems.append(f"{where}: array {index} has dtype {array.get('dtype')}, expected "
                            f"{SECAGG_MASKED_DTYPE} (Flower's masked integers)")
        elif array.get("data_bytes") != 8 * count:
            problems.append(f"{where}: array {index} carries {array.get('data_bytes')} bytes "
                            f"for shape {array.get('shape')} ({8 * count} expected)")
        if not isinstance(array.get("header_bytes"), int) or \
                array["header_bytes"] > SECAGG_MAX_HEADER_BYTES:
            problems.append(f"{where}: array {index} has a header of "
                            f"{array.get('header_bytes')} bytes, at most "
                            f"{SECAGG_MAX_HEADER_BYTES} allowed")
    shapes = [tuple(a.get("shape", ())) if isinstance(a, dict) else None for a in arrays]
    adapter = [tuple(expected[k]) for k in sorted(expected)]
    if expected and isinstance(slots, int) and not isinstance(slots, bool) and slots >= 0:
        # shared.privacy.secagg.pack's layout behind Flower's weight (flwr factor_combine)
        want = [(1,)] + adapter * (slots + 1)
        if len(shapes) != len(want):
            problems.append(f"{where}: {len(shapes)} arrays, expected {len(want)} (the weight, "
                            f"the global change and {slots} persona slots)")
        else:
            problems += [f"{where}: array {i} has shape {list(got)}, expected {list(need)}"
                         for i, (got, need) in enumerate(zip(shapes, want))
                         if got is not None and got != need]
    else:
        size = sum(math.prod(s) for s in adapter)
        bound = 1 + size * (1 + MAX_PERSONA_SLOTS) if expected else MAX_MASKED_ELEMENTS
        if total > bound:
            problems.append(f"{where}: {total} masked integers, at most {bound} allowed (the "
                            "log does not give the round's layout)")
    return problems


def _check_fitres(name: str, record: Mapping[str, object]) -> list[str]:
    """The FitRes records Flower's mod sends beside the masked vector."""
    if name == "fitres.parameters":  # Flower empties it: the adapters leave masked only
        return [f"{name}: tensor {key!r} may not leave in clear"
                for key in sorted(record.get("arrays", {}))]
    if name == "fitres.num_examples":
        values = record.get("values", {})
        problems = [f"{name}: unexpected metric {key!r}"
                    for key in sorted(set(values) - {"num_examples"})]
        weight = values.get("num_examples")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            problems.append(f"{name}: num_examples is {weight!r}, not a count")
        return problems
    details = _details(record)
    if name == "fitres.metrics":  # the metrics of a plain train reply, as a config record
        problems = []
        for key, info in sorted(details.items()):
            if key not in REPLY_METRICS["train"]:
                problems.append(f"{name}: metric {key!r} is not one a train reply may send")
            elif info.get("type") not in ("int", "float"):
                problems.append(f"{name}: metric {key!r} is a {info.get('type')}, not a "
                                "scalar number")
        return problems
    problems = _check_fields(name, details, {"code": ("int", None), "message": ("str", None)})
    message = details.get("message", {})
    if message.get("type") == "str" and message.get("len") != 0:
        problems.append(f"{name}: 'message' is a str of length {message.get('len')} (only "
                        "an empty status message may leave)")
    return problems


def _details(record: Mapping[str, object]) -> dict[str, dict]:
    """A config record's per-key description; an older log has types only."""
    details = record.get("details")
    if isinstance(details, dict):
        return details
    return {key: {"type": kind} for key, kind in record.get("values", {}).items()}
