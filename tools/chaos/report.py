"""What a chaos run found, as figures (``summarise``) and as text (``render``).

Figures, all counted at the end of the chain by sequence number:

- **lost**: messages never delivered, plus healthy messages (not the poison) that
  the chain dead-lettered: the chain never delivered them either. Must be 0.
- **duplicates delivered**: deliveries beyond the first of each message.
- **duplicates left after --dedup**: the same, once each delivery whose ``sb-id``
  is among the last ``--dedup`` ids kept is dropped, as ``streamboss consume
  --dedup N`` drops it. Outputs of a redelivered input carry the same ids only if
  the agent derives them from the input; otherwise this equals the line above.
- **poison**: the attempts its dead letter's ``sb-dead-attempts`` header states
  (a dead letter of the broker's delivery-limit backstop has none: it is reported
  as such and counts as over the limit), and how many times its program actually
  ran (each run killed an agent). Both must be at most ``max_attempts``.
- **recovery** of a fault: from the moment it began until the first message after
  it was over arrived on the stream the fault concerns (the faulted operation's
  output for a kill or close, the chain's output otherwise; for the poison, from
  each agent it killed). The slowest one is the headline.

A delivery the harness's own consumer got twice (its ack lost with its
connection) is not counted at all; the report says how many there were.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

from .chain import Chain
from .faults import KINDS, Fault
from .ledger import DeadLetter, Tally

EXAMPLES = 10


def dead_reason(letter: DeadLetter) -> str:
    """Why the chain gave up on a message, as its headers say."""
    reason = letter.header("sb-dead-reason")
    if reason:
        return str(reason)
    if letter.delivery_limit_deaths:
        return "agent crash or kill (broker delivery limit)"
    return "no sb-dead-reason header"


def dead_attempts(letter: DeadLetter) -> int | None:
    value = letter.headers.get("sb-dead-attempts")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def longest_pause(times: list[float]) -> float:
    """The longest time between two consecutive outputs (0 with fewer than two)."""
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def summarise(*, chain: Chain, settings: dict[str, Any], faults: list[Fault], tally: Tally,
              poison_kills: list[tuple[float, int]],
              poison_recoveries: list[float | None], published: int, resent: set[int],
              started: float, ended: float, timed_out: bool,
              notes: list[str]) -> dict[str, Any]:
    """Every figure of the run, as plain data (``--json`` writes this)."""
    n = settings["messages"]
    max_attempts = settings["max_attempts"]
    with tally.lock:
        counts = list(tally.counts)
        kept = list(tally.after_dedup)
        dead = list(tally.dead)
        times = list(tally.output.times)
        poison_dead = tally.poison_dead
        extra = {"wrong_bodies": len(tally.wrong_bodies),
                 "wrong_body_examples": [f"{s}: {b!r}" for s, b in tally.wrong_bodies[:5]],
                 "strangers": [repr(b) for b in tally.strangers],
                 "poison_outputs": tally.poison_outputs,
                 "own_redeliveries": tally.own_redeliveries}
    never = [seq for seq in range(n) if counts[seq] == 0]
    healthy_dead: list[dict[str, Any]] = []
    for letter in dead:
        if letter is poison_dead:
            continue
        seq = chain.sequence(letter.body.upper())
        healthy_dead.append({"seq": seq, "operation": chain.short(letter.operation),
                             "reason": dead_reason(letter),
                             "delivered_anyway": seq is not None and counts[seq] > 0})
    lost = set(never) | {d["seq"] for d in healthy_dead if d["seq"] is not None}
    delivered = sum(counts)
    distinct = sum(1 for c in counts if c)
    duplicates = delivered - distinct
    poison = None
    if settings["poison"]:
        attempts = dead_attempts(poison_dead) if poison_dead else None
        limit = bool(poison_dead and poison_dead.delivery_limit_deaths
                     and attempts is None)
        poison = {
            "published": any(f.kind == "poison" and f.ok for f in faults),
            "dead_lettered": poison_dead is not None,
            "sb_dead_attempts": attempts,
            "reason": dead_reason(poison_dead) if poison_dead else None,
            "operation": chain.short(poison_dead.operation) if poison_dead else None,
            "broker_delivery_limit": limit,
            "program_runs": len(poison_kills),
            "max_attempts": max_attempts,
            "within_max_attempts": poison_dead is not None and not limit
            and attempts is not None and attempts <= max_attempts
            and len(poison_kills) <= max_attempts,
            "recoveries_s": poison_recoveries,
        }
    recoveries = [(f.recovery, f"{f.kind} {describe_target(chain, f)}".strip())
                  for f in faults if f.recovery is not None]
    recoveries += [(r, f"poison kill {i + 1}") for i, r in enumerate(poison_recoveries)
                   if r is not None]
    never_recovered = [f"{f.kind} {describe_target(chain, f)}".strip()
                       for f in faults if f.ok and f.recovery is None and f.kind != "poison"]
    never_recovered += [f"poison kill {i + 1}" for i, r in enumerate(poison_recoveries)
                        if r is None]
    slowest = max(recoveries, default=None)
    planned = Counter(f.kind for f in faults)
    done = Counter(f.kind for f in faults if f.ok)
    summary: dict[str, Any] = {
        "run": chain.run,
        "settings": settings,
        "published": published,
        "resent_by_harness": len(resent),
        "deliveries": delivered,
        "distinct_delivered": distinct,
        "lost": len(lost),
        "never_delivered": len(never),
        "never_delivered_examples": never[:EXAMPLES],
        "healthy_dead_lettered": len(healthy_dead),
        "healthy_dead_examples": healthy_dead[:EXAMPLES],
        "healthy_dead_reasons": dict(Counter(d["reason"] for d in healthy_dead)),
        "duplicates": duplicates,
        "duplicated_messages": sum(1 for c in counts if c > 1),
        "max_copies": max(counts, default=0),
        "duplicates_after_dedup": sum(kept) - sum(1 for c in kept if c),
        "dropped_entirely_by_dedup": sum(1 for s in range(n) if counts[s] and not kept[s]),
        "poison": poison,
        "faults": [{"kind": f.kind, "target": describe_target(chain, f),
                    "at_s": None if f.started is None else round(f.started - started, 1),
                    "ok": f.ok, "detail": f.detail,
                    "recovery_s": None if f.recovery is None else round(f.recovery, 2)}
                   for f in faults],
        "faults_planned": {k: planned[k] for k in KINDS},
        "faults_done": {k: done[k] for k in KINDS},
        "slowest_recovery_s": None if slowest is None else round(slowest[0], 2),
        "slowest_recovery_after": None if slowest is None else slowest[1],
        "never_recovered": never_recovered,
        "longest_output_pause_s": round(longest_pause(times), 2),
        "dead_letters": len(dead),
        "elapsed_s": round(ended - started, 1),
        "timed_out": timed_out,
        "notes": notes,
        **extra,
    }
    failures = []
    if lost:
        failures.append(f"{len(lost)} message(s) lost")
    if poison is not None and not poison["within_max_attempts"]:
        failures.append("the poison message was not dead-lettered within max_attempts")
    if poison is not None and extra["poison_outputs"]:
        failures.append("the poison message came out of the chain")
    missing = [k for k in KINDS if done[k] < planned[k]]
    if missing:
        failures.append("faults not done: " + ", ".join(
            f"{k} {done[k]} of {planned[k]}" for k in missing))
    if extra["wrong_bodies"]:
        failures.append(f"{extra['wrong_bodies']} output(s) with a wrong body")
    summary["failures"] = failures
    summary["passed"] = not failures
    return summary


def describe_target(chain: Chain, fault: Fault) -> str:
    if fault.target in chain.operations:
        return chain.short(fault.target)
    return fault.target


def _seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "never"
    return f"{value:.1f} s"


def render(summary: dict[str, Any], work_dir: str) -> str:
    """The report a person reads: settings, the faults as they came, then the figures."""
    s = summary["settings"]
    lines = [
        f"streamboss chaos run {summary['run']}: {s['messages']:,} messages through "
        f"cat (service) -> tr a-z A-Z (per-message) -> a program failing "
        f"{s['fail_percent']:g}% of attempts (per-message); max_attempts {s['max_attempts']}, "
        f"up to {s['max_agents']} agents per operation",
        "",
        "faults:",
    ]
    for fault in summary["faults"]:
        at = "   ----" if fault["at_s"] is None else f"{fault['at_s']:7.1f}"
        recovery = ("" if not fault["ok"] or fault["kind"] == "poison" else
                    f"  -> flowing again after {_seconds(fault['recovery_s'])}")
        lines.append(f"  t+{at} s  {fault['kind']:7} {fault['detail']}{recovery}")
    poison = summary["poison"]
    if poison:
        for i, value in enumerate(poison["recoveries_s"]):
            lines.append(f"             poison kill {i + 1}: flowing again after "
                         f"{_seconds(value)}")
    planned, done = summary["faults_planned"], summary["faults_done"]
    lines.append("  done: " + ", ".join(f"{k} {done[k]}/{planned[k]}" for k in planned))
    lines.append("")
    lost_detail = (f"(never delivered {summary['never_delivered']}, dead-lettered though "
                   f"healthy {summary['healthy_dead_lettered']})")
    lines.append(f"messages lost:                  {summary['lost']:,} {lost_detail}")
    if summary["never_delivered_examples"]:
        lines.append(f"  never delivered, e.g. seq {summary['never_delivered_examples']}")
    for reason, count in summary["healthy_dead_reasons"].items():
        lines.append(f"  dead-lettered {count}: {reason}")
    lines.append(f"duplicates delivered:           {summary['duplicates']:,} "
                 f"({summary['deliveries']:,} deliveries of {summary['distinct_delivered']:,} "
                 f"messages; {summary['duplicated_messages']:,} delivered more than once, "
                 f"at most {summary['max_copies']} times)")
    lines.append(f"duplicates left after --dedup:  {summary['duplicates_after_dedup']:,} "
                 f"(--dedup {s['dedup']:,}: sb-id seen among the last {s['dedup']:,})")
    if poison is None:
        lines.append("poison message:                 not sent (--no-poison)")
    elif poison["dead_lettered"]:
        attempts = poison["sb_dead_attempts"]
        stated = ("no sb-dead-attempts header" if attempts is None
                  else f"{attempts} attempts (sb-dead-attempts)")
        lines.append(f"poison message:                 dead-lettered by {poison['operation']} "
                     f"after {stated}, max_attempts {poison['max_attempts']}; its program "
                     f"ran {poison['program_runs']} times; reason: {poison['reason']}")
    else:
        lines.append(f"poison message:                 NOT dead-lettered; its program ran "
                     f"{poison['program_runs']} times (each run killed an agent), "
                     f"max_attempts {poison['max_attempts']}")
    slowest = summary["slowest_recovery_s"]
    lines.append("slowest recovery after a fault: " + (
        "none measured" if slowest is None
        else f"{slowest:.1f} s ({summary['slowest_recovery_after']})"))
    if summary["never_recovered"]:
        lines.append(f"  no output after: {', '.join(summary['never_recovered'])}")
    lines.append(f"longest pause in outputs:       {summary['longest_output_pause_s']:.1f} s")
    lines.append(f"elapsed:                        {summary['elapsed_s']:.0f} s"
                 + (" (gave up waiting: deadline passed)" if summary["timed_out"] else ""))
    other = []
    if summary["wrong_bodies"]:
        other.append(f"{summary['wrong_bodies']} wrong bodies, e.g. "
                     f"{summary['wrong_body_examples'][:2]}")
    if summary["strangers"]:
        other.append(f"unexpected outputs, e.g. {summary['strangers'][:2]}")
    if summary["resent_by_harness"]:
        other.append(f"{summary['resent_by_harness']} inputs published again by the harness "
                     "after a failed publish")
    if summary["own_redeliveries"]:
        other.append(f"{summary['own_redeliveries']} redeliveries to the harness's own "
                     "consumer (not counted)")
    other.extend(summary["notes"])
    if other:
        lines.append("also: " + "; ".join(other))
    lines.append(f"logs: {work_dir} (manager.log, state/logs/<operation>.log)")
    lines.append("")
    lines.append("PASSED" if summary["passed"]
                 else "FAILED: " + "; ".join(summary["failures"]))
    return "\n".join(lines)
