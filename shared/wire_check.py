"""Hold a device's wire log (see :mod:`client.wire_log`) to what may leave the device.

Allowed in a reply: for a train reply, the ``global`` and ``persona`` adapter
records, each with exactly the expected tensor names and shapes in a float
dtype, none equal to a tensor of the on-device user adapter; for every reply, a
``metrics`` record whose names are in :data:`shared.wire.REPLY_METRICS` and whose
values are scalar numbers. Anything else (a config record, which can carry
strings; an integer array, which can carry token ids; a list-valued metric; an
unknown name) is a violation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from shared.wire import KEY_METRICS, REPLY_ARRAYS, REPLY_METRICS

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


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
