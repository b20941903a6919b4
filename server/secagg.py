"""Secure aggregation of a round with Flower's SecAgg+ (``secagg = true``).

The server sees only sums. One run of Flower's :class:`SecAggPlusWorkflow` per
round, over all sampled clients, replaces the plain send-and-receive: its four
stages (setup, share keys, collect masked vectors, unmask) go through our Grid as
TRAIN messages; in the third, each client receives the usual round content, trains,
and uploads a masked vector laid out by :mod:`shared.privacy.secagg` (global change, then
one slot per persona, filled only in the client's own). Unmasking yields the
example-weighted mean change of the global adapter and each slot's weighted sum,
which becomes each persona's mean change over its members: SecAgg+ is one way to
compute the round's sum, and its mean changes take the same step as every other path
(:func:`server.strategy.apply_changes`). Nothing of the cryptography is
ours: key agreement, Shamir sharing, masking and dropout recovery are Flower's
(``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py`` and
``flwr/client/mod/secure_aggregation/secaggplus_mod.py``).

Flower's workflow was written for the legacy Strategy API: it asks
``strategy.configure_fit`` whom to sample and hands the unmasked mean to
``strategy.aggregate_fit``. A two-method :class:`_SumStrategy` answers with this
round's sampled nodes and keeps the mean, and :class:`_Workflow` swaps the FitIns
Flower would send for our own round content (the only change to Flower's flow).

What the server can no longer do: validate an individual update (shapes, finite
values, the ``max-update-norm`` bound): it never sees one. Each client checks and
clips its own change before masking (:mod:`client.mods.secagg`); the server checks what
it can see in clear (example counts, the persona slot, the masked vector's layout)
and treats a reply that fails as a dropout, which SecAgg+ removes from the sum. A
malicious client can still add any vector within the clipping range. Other limits:

* a persona with one member in a round has its sum equal to that member's change
  (membership is public), so it is protected only by the client's DP;
* the mean is quantized: per coordinate it differs from the plain mean by less than
  :func:`shared.privacy.secagg.error_bound`. The rounding is random but seeded on each device
  from its secret and the instruction (:func:`client.mods.secagg.rounding_seed`): unseeded,
  a resumed run's next instruction, and so every later DP draw, would differ from an
  uninterrupted run's; seeded, a resumed run reproduces it bit for bit;
* upload is K + 1 adapters per client (plus Flower's keys and shares), not 2;
* Flower's ``pseudo_rand_gen`` (``flwr/common/secure_aggregation/secaggplus_utils.py``)
  seeds numpy's RandomState with 32 bits folded from each 32-byte secret: that is
  Flower's implementation, adopted as is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.error import Error
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.common.serde import recorddict_to_proto
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from server.aggregation import GLOBAL, Changes, ClientUpdate, level_name
from shared.config import RunConfig
from shared.privacy.secagg import (
    MODULUS_RANGE,
    check_layout,
    error_bound,
    quantized_weight,
    unpack,
)
from shared.protocol.validation import UpdateRejected
from shared.protocol.wire import KEY_CONFIG, KEY_METRICS, KEY_ROUND

FITRES_METRICS = "fitres.metrics"
FITRES_WEIGHT = "fitres.num_examples"


class SecureRound:
    """One round's secure aggregation, in the shape of the plain round loop.

    :meth:`run` replaces ``grid.send_and_receive`` and returns one reply per client
    that carries only its metrics (or an error); :meth:`parse` replaces
    ``parse_reply`` (no tensors: the update's weight and persona only);
    :meth:`mean_changes` replaces ``round_changes`` with the unmasked mean changes;
    :meth:`history` adds what the round cost to the round's history entry. ``observe``,
    when given, is shown every reply the server receives during the protocol as
    ``(stage, reply)`` (tests check with it what the server held).
    """

    def __init__(self, grid, cfg: RunConfig, personas: tuple[str, ...],
                 expected: dict[str, tuple[int, ...]], *, server_round: int,
                 persona_of: Callable[[int], str | None], discovering: bool,
                 observe: Callable[[str, Message], None] | None = None) -> None:
        self.grid, self.cfg, self.personas, self.expected = grid, cfg, personas, expected
        self.server_round, self.persona_of, self.discovering = (server_round, persona_of,
                                                                discovering)
        self.observe = observe
        self.members: dict[int, tuple[int, int]] = {}  # node -> (slot, examples) summed
        self.mean: list[np.ndarray] | None = None  # the unmasked vector (shared.privacy.secagg)
        self.stages: dict[str, dict] = {}
        self.shares = self.threshold = 0
        self.seconds = 0.0
        self.failure = ""
        # node -> epsilon its device reported in a halted round: it trained and spent
        # although nothing was summed, and the report must not understate that
        self.spent: dict[int, float] = {}

    # -- the protocol ------------------------------------------------------------------
    def run(self, messages: Sequence[Message]) -> list[Message]:
        """Train the sampled clients under SecAgg+; their metrics replies (or errors)."""
        started = time.monotonic()
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        sampled = len(contents)
        cfg = self.cfg
        self.shares = (sampled if not cfg.secagg_num_shares or cfg.secagg_num_shares >= sampled
                       else cfg.secagg_num_shares)
        self.threshold = cfg.secagg_reconstruction_threshold or self.shares // 2 + 1
        if sampled < 3:
            return self._fail(messages, f"secure aggregation needs >= 3 clients in a round, "
                                        f"{sampled} sampled")
        if self.threshold >= self.shares:
            return self._fail(messages, f"secure aggregation: a threshold of {self.threshold} "
                                        f"shares needs more than {self.shares} clients")
        strategy = _SumStrategy(list(contents))
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}), strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: self.server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        grid = _ProtocolGrid(self, next(iter(contents.values())))
        _Workflow(contents, num_shares=self.shares, reconstruction_threshold=self.threshold,
                  max_weight=float(cfg.secagg_max_weight),
                  clipping_range=cfg.secagg_clipping_range,
                  quantization_range=cfg.secagg_quantization_range,
                  modulus_range=MODULUS_RANGE, timeout=cfg.round_timeout or None)(grid, context)
        self.mean = strategy.mean
        self.seconds = time.monotonic() - started
        if self.mean is None:
            self.failure = (f"secure aggregation halted: too few clients stayed for a "
                            f"threshold of {self.threshold} of {self.shares} shares")
            self.members = {}
            if not grid.collected:  # halted before anyone trained
                return [_error(m, self.failure) for m in messages]
            self.spent = {req.metadata.dst_node_id: float(_metrics(r)["epsilon"])
                          for req, r in grid.collected
                          if not r.has_error() and "epsilon" in _metrics(r)}
            return [r if r.has_error() else _error(req, self.failure)
                    for req, r in grid.collected]
        return [r if r.has_error() else
                Message(RecordDict({KEY_METRICS: MetricRecord(_metrics(r))}), reply_to=req)
                for req, r in grid.collected]

    def screen(self, request: Message, reply: Message) -> Message:
        """A masked-vector reply, or an error reply (a dropout to SecAgg+) when what the
        server can check in clear is wrong."""
        if reply.has_error():
            return reply
        node = request.metadata.dst_node_id
        try:
            metrics = _metrics(reply)
            weight = int(reply.content.metric_records[FITRES_WEIGHT]["num_examples"])
            declined = int(metrics.get("declined", 0))
            if declined:
                if weight != 0:
                    raise ValueError(f"a declined client weighs {weight}, not 0")
            else:
                examples = metrics.get("num-examples")
                if not isinstance(examples, int) or not 0 < examples <= \
                        self.cfg.secagg_max_weight or weight != examples:
                    raise ValueError(f"num-examples {examples!r} (weight {weight}) must be in "
                                     f"[1, secagg-max-weight = {self.cfg.secagg_max_weight}]")
            slot = self._slot(node, metrics) if not declined else -1
            masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            shapes = [tuple(bytes_to_ndarray(b).shape) for b in masked]
            if shapes[:1] != [(1,)]:
                raise ValueError("the masked vector has no weight")
            check_layout(shapes[1:], self.expected, len(self.personas))
        except (KeyError, ValueError, TypeError) as err:
            return _error(request, f"rejected before unmasking: {err}")
        if not declined:
            self.members[node] = (slot, weight)
        return reply

    def _slot(self, node: int, metrics: dict) -> int:
        slot = metrics.get("persona-index", -1)
        if self.discovering:
            if not isinstance(slot, int) or not 0 <= slot < len(self.personas):
                raise ValueError(f"persona-index {slot!r} is not one of the "
                                 f"{len(self.personas)} discovered personas")
            return slot
        persona = self.persona_of(node)
        want = self.personas.index(persona) if persona is not None else -1
        if slot != want:
            raise ValueError(f"persona-index {slot!r}, expected {want}")
        return slot

    # -- the round loop's hooks ----------------------------------------------------------
    def parse(self, reply: Message, persona: str | None) -> tuple[ClientUpdate | None, dict]:
        """What the round loop learns of one client: its metrics and weight, no tensors."""
        if reply.has_error():
            raise UpdateRejected(f"client error: {reply.error.reason}")
        metrics = dict(reply.content.metric_records[KEY_METRICS])
        if int(metrics.get("declined", 0)):
            return None, metrics
        metrics["update-norm"] = float("nan")  # one client's change is never seen
        return ClientUpdate(global_state={}, persona=persona or "", persona_state={},
                            num_examples=int(metrics["num-examples"])), metrics

    def mean_changes(self, updates: Sequence[ClientUpdate]) -> Changes:
        """The round's mean change of each level, from the unmasked vector: global's over
        every summed client, each slot's weighted sum over its members' weight. Empty
        when nothing was summed."""
        if self.mean is None or not self.members:
            return {}
        summed = sorted((self._persona_name(slot), n) for slot, n in self.members.values())
        accepted = sorted((u.persona, u.num_examples) for u in updates)
        if accepted != summed:  # the loop and the protocol must agree on who counted
            raise RuntimeError(f"the accepted updates {accepted} are not those summed {summed}")
        global_change, slots = unpack(self.mean, self.expected, len(self.personas))
        weights = self._weights()
        total = sum(weights.values())
        changes = {GLOBAL: _tensors(global_change, 1.0)}
        for slot in sorted(weights):
            if slot >= 0:  # sum_members q_i d_i / total; times total / q_slot: their mean
                changes[level_name(self.personas[slot])] = _tensors(slots[slot],
                                                                    total / weights[slot])
        return changes

    def history(self) -> dict:
        """The round's secure-aggregation record (its entry in the round history)."""
        cfg = self.cfg
        entry: dict = {
            "protocol": "SecAgg+ (Flower)", "shares": self.shares, "threshold": self.threshold,
            "summed": len(self.members), "clipping_range": cfg.secagg_clipping_range,
            "quantization_range": cfg.secagg_quantization_range,
            "max_weight": cfg.secagg_max_weight,
            "seconds": round(self.seconds, 3),
            "stages": self.stages,
            "bytes_sent": sum(s["bytes_sent"] for s in self.stages.values()),
            "bytes_received": sum(s["bytes_received"] for s in self.stages.values()),
        }
        if self.failure:
            entry["failure"] = self.failure
        if self.members and self.mean is not None:
            vectors = self.stages.get(Stage.COLLECT_MASKED_VECTORS, {}).get("summed", 0)
            weights = self._weights()
            bound = {"global": error_bound(vectors, sum(weights.values()),
                                           clipping_range=cfg.secagg_clipping_range,
                                           quantization_range=cfg.secagg_quantization_range)}
            for slot, weight in weights.items():
                if slot >= 0:
                    bound[f"persona/{self.personas[slot]}"] = error_bound(
                        vectors, weight, clipping_range=cfg.secagg_clipping_range,
                        quantization_range=cfg.secagg_quantization_range)
            entry["quantization_error_bound"] = bound
            global_change, _ = unpack(self.mean, self.expected, len(self.personas))
            entry["global_change_norm"] = float(np.sqrt(sum(np.square(v).sum()
                                                            for v in global_change.values())))
        return {"secure_aggregation": entry}

    # -- helpers ---------------------------------------------------------------------------
    def _persona_name(self, slot: int) -> str:
        return self.personas[slot] if slot >= 0 else ""

    def _weights(self) -> dict[int, int]:
        """slot -> the members' quantized weight (-1: clients without a persona)."""
        out: dict[int, int] = {}
        for slot, n in self.members.values():
            out[slot] = out.get(slot, 0) + quantized_weight(
                n, max_weight=self.cfg.secagg_max_weight,
                quantization_range=self.cfg.secagg_quantization_range)
        return out

    def _fail(self, messages: Sequence[Message], reason: str) -> list[Message]:
        self.failure = reason
        return [_error(m, reason) for m in messages]


class _ProtocolGrid:
    """The Grid as Flower's workflow sees it: every stage's messages also carry the run
    config and round (the device's wire log names the round by them); sizes and
    times are recorded; masked vectors are screened before they are summed."""

    def __init__(self, secure: SecureRound, content: RecordDict) -> None:
        self.secure = secure
        self.extra = {KEY_CONFIG: content[KEY_CONFIG], KEY_ROUND: content[KEY_ROUND]}
        self.collected: list[tuple[Message, Message]] = []

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) \
            if messages else "none"
        for message in messages:
            for name, record in self.extra.items():
                if name not in message.content:
                    message.content[name] = record
        sent = sum(_size(m) for m in messages)
        started = time.monotonic()
        replies = list(self.secure.grid.send_and_receive(messages, timeout=timeout))
        seconds = time.monotonic() - started
        received = sum(_size(r) for r in replies)
        if self.secure.observe is not None:
            for reply in replies:
                self.secure.observe(stage, reply)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            by_node = {m.metadata.dst_node_id: m for m in messages}
            replies = [self.secure.screen(by_node[r.metadata.src_node_id], r)
                       if r.metadata.src_node_id in by_node else r for r in replies]
            self.collected = [(by_node[r.metadata.src_node_id], r) for r in replies
                              if r.metadata.src_node_id in by_node]
        self.secure.stages[stage] = {
            "seconds": round(seconds, 3), "messages": len(messages),
            "replies": sum(not r.has_error() for r in replies),
            "bytes_sent": sent, "bytes_received": received,
            **({"summed": sum(not r.has_error() for r in replies)}
               if stage == Stage.COLLECT_MASKED_VECTORS else {})}
        return replies


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ with our round content in place of a FitIns."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:
        """Flower's stage, then the protocol narrowed to the nodes that shared their keys.

        Flower 1.42 keeps every sampled node in ``sampled_node_ids`` and in each node's
        neighbours, so a node lost before it shared its keys (setup or this stage) is
        later unmasked as a dropout: its peers hold no share of its key (each raises
        ``KeyError`` in ``secaggplus_mod._unmask``), the server finds too few shares and
        halts, and a dropout after masking would have the server remove pairwise masks
        with such a node that no one ever added. Measured on real SuperNodes: one node
        lost at setup halted the round. No client masks with a node whose key shares it
        never received, so those nodes are not part of the sum at all."""
        ok = super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {nid: neighbours & shared
                                   for nid, neighbours in state.nid_to_neighbours.items()}
        return ok


class _SumStrategy(Strategy):
    """Just enough of a legacy Strategy for the workflow: sample these nodes, keep the mean."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(node), FitIns(Parameters([], ""), {})) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # the workflow puts the unmasked mean into every result's parameters
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Proxy(ClientProxy):
    """A node id, which is all the workflow reads of a proxy."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def _unused(self, *args, **kwargs):
        raise NotImplementedError("the SecAgg+ workflow talks to nodes through the Grid")

    get_properties = get_parameters = fit = evaluate = reconnect = _unused


def _metrics(reply: Message) -> dict:
    return dict(reply.content.config_records[FITRES_METRICS])


def _error(request: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=request)


def _size(message: Message) -> int:
    return 0 if message.has_error() else recorddict_to_proto(message.content).ByteSize()


def _tensors(change: dict[str, np.ndarray], scale: float) -> dict[str, torch.Tensor]:
    """``scale * change`` as float64 tensors."""
    return {k: scale * torch.from_numpy(np.asarray(v, dtype=np.float64))
            for k, v in change.items()}
