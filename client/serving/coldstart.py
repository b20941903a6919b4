"""Which adapters serve a user: the cold-start fallback.

In order (the design's "Personas and cold start"):
1. the user's own adapter, if one was trained (with global and the user's persona);
2. else the declared persona (a label in the profile), if the server has its adapter;
3. else the persona whose adapter has the lowest loss on the user's few examples,
   computed on the device, no training, if it fits better than global alone;
4. else global only.

:func:`choose_adapters` is pure: the caller computes the losses on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

SERVED_USER = "user"
SERVED_DECLARED = "persona (declared)"
SERVED_FITTED = "persona (lowest loss on the user's examples)"
SERVED_GLOBAL = "global"


@dataclass(frozen=True)
class AdapterChoice:
    levels: tuple[str, ...]  # adapters to activate: "global", "persona", "user"
    persona: str | None  # which persona adapter goes into the persona slot
    served_by: str  # one of the SERVED_* labels
    reason: str  # one sentence for --explain


def choose_adapters(*, has_user_adapter: bool, declared_persona: str | None,
                    known_personas: tuple[str, ...] | list[str],
                    persona_losses: Mapping[str, float] | None = None,
                    global_loss: float | None = None,
                    untrained_personas: tuple[str, ...] | frozenset[str] = ()) -> AdapterChoice:
    """Apply the fallback order. ``persona_losses`` maps persona -> mean loss of
    global+persona on the user's examples; ``global_loss`` is global alone.
    ``untrained_personas`` (adapters no round ever trained: they would serve the base
    model's output under another name) are never served, and a user who declares one
    is told so."""
    known_personas = [p for p in known_personas if p not in untrained_personas]
    persona_losses = None if persona_losses is None else {
        p: v for p, v in persona_losses.items() if p not in untrained_personas}
    declared = declared_persona if declared_persona in known_personas else None
    if has_user_adapter:
        persona = declared or _best(persona_losses, global_loss)
        levels = ("global", "persona", "user") if persona else ("global", "user")
        return AdapterChoice(levels, persona, SERVED_USER,
                             "this user has a trained user adapter" +
                             (f" (with persona {persona})" if persona else ""))
    if declared:
        return AdapterChoice(("global", "persona"), declared, SERVED_DECLARED,
                             f"the profile declares persona {declared!r}")
    ignored = (f"persona {declared_persona!r} never trained (its adapter is untouched), so "
               "it is not served; " if declared_persona in untrained_personas else
               f"declared persona {declared_persona!r} is unknown to the server; "
               if declared_persona and not declared else "")
    best = _best(persona_losses, global_loss)
    if best is not None:
        versus = f" vs {global_loss:.3f} for global alone" if global_loss is not None else ""
        return AdapterChoice(
            ("global", "persona"), best, SERVED_FITTED,
            f"{ignored}persona {best!r} has the lowest loss on the user's examples "
            f"({persona_losses[best]:.3f}{versus}) among {len(persona_losses)} personas")
    if persona_losses:
        why = "no persona adapter fits the user's examples better than global alone"
    elif persona_losses is not None:
        why = "there is no persona adapter to compare"
    else:
        why = "no user adapter, no declared persona and no examples"
    return AdapterChoice(("global",), None, SERVED_GLOBAL, ignored + why)


def _best(persona_losses: Mapping[str, float] | None, global_loss: float | None) -> str | None:
    finite = {p: v for p, v in (persona_losses or {}).items() if math.isfinite(v)}
    if not finite:
        return None
    best = min(sorted(finite), key=lambda p: finite[p])
    if global_loss is not None and not finite[best] < global_loss:
        return None
    return best
