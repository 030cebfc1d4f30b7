"""Ratios, targets and the printed table."""

from __future__ import annotations

import math
from typing import Any

# (name, numerator, denominator, what, comparison, threshold)
RATIOS = [
    ("service_vs_plain", "svc-cat", "plain", "rate"),
    ("service_vs_naive", "svc-cat", "naive", "rate"),
    ("service_tr_vs_plain", "svc-tr", "plain", "rate"),
    ("service_tr_vs_naive", "svc-tr", "naive", "rate"),
    ("per_message_vs_spawn", "pm", "spawn", "rate"),
    ("service_vs_plain_with_headers", "svc-cat", "plain-hdr", "rate"),
    ("plain_with_headers_vs_plain", "plain-hdr", "plain", "rate"),
    ("per_message_c2_vs_spawn", "pm-c2", "spawn", "rate"),
    ("per_message_c4_vs_spawn", "pm-c4", "spawn", "rate"),
]

# (ratio name, description, ">=" or "<=", threshold)
TARGETS = [
    ("service_vs_plain", "service mode (cat filter) >= 0.8 x plain async-confirm relay",
     ">=", 0.8),
    ("service_vs_naive", "service mode (cat filter) >= 6 x naive confirm-each relay", ">=", 6.0),
    ("per_message_vs_spawn", "per-message mode (tr, default concurrency) >= 1.8 x spawn loop",
     ">=", 1.8),
    ("service_p99_vs_plain", "service-mode p99 latency at 500/s <= 2 x plain relay's", "<=", 2.0),
]

# Storage targets: (figure path, description, comparison, threshold).
STORAGE_TARGETS = [
    (("objects", "ratio"), "stream-file round trip >= 0.8 x raw boto3 upload+download",
     ">=", 0.8),
    (("rss", "uploader_mb"), "stream-file peak RSS while streaming the large file < 100 MB",
     "<", 100.0),
    (("rss", "agent_mb"), "agent peak RSS while streaming the large object < 100 MB",
     "<", 100.0),
]


def _rate(figures: dict[str, Any], key: str) -> float:
    row = figures["rows"].get(key)
    if not row:
        return math.nan
    return float(row["summary"].get("rate", math.nan))


def _latency(figures: dict[str, Any], key: str, rate: float) -> dict[str, Any] | None:
    for entry in figures["latency"]:
        if entry["row"] == key and entry["rate"] == rate and "p99_ms" in entry:
            return entry
    return None


def _per_round(figures: dict[str, Any], top: str, bottom: str) -> list[float]:
    """The ratio within each round (the two rows ran minutes apart at most)."""
    def rates(key: str) -> dict[int, float]:
        return {run["round"]: run["rate"] for run in figures["rows"][key]["runs"]
                if "rate" in run}
    upper, lower = rates(top), rates(bottom)
    return [upper[r] / lower[r] for r in sorted(upper) if r in lower]


def evaluate(figures: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Ratios of median rates (and of p99 latencies) and the targets' verdicts."""
    ratios: dict[str, float] = {}
    by_round: dict[str, list[float]] = {}
    for name, top, bottom, _what in RATIOS:
        if top in figures["rows"] and bottom in figures["rows"]:
            ratios[name] = _rate(figures, top) / _rate(figures, bottom)
            by_round[name] = _per_round(figures, top, bottom)
    plain = _latency(figures, "plain", 500.0)
    service = _latency(figures, "svc-cat", 500.0)
    if plain and service:
        ratios["service_p99_vs_plain"] = service["p99_ms"] / plain["p99_ms"]
        if "p99_ms_all" in plain and "p99_ms_all" in service:
            by_round["service_p99_vs_plain"] = [
                s / p for s, p in zip(service["p99_ms_all"], plain["p99_ms_all"], strict=False)]
        ratios["service_p50_vs_plain"] = service["p50_ms"] / plain["p50_ms"]
    targets = []
    for name, text, op, threshold in TARGETS:
        value = ratios.get(name, math.nan)
        if math.isnan(value):
            verdict = "N/A"
        elif (value >= threshold) if op == ">=" else (value <= threshold):
            verdict = "PASS"
        else:
            verdict = "MISS"
        targets.append({"target": text, "ratio": value, "op": op, "threshold": threshold,
                        "verdict": verdict, "by_round": by_round.get(name, [])})
    return ratios, targets


# Cores used by other work during a window above which a figure is flagged as noisy.
NOISY_OTHER_CORES = 0.25


def _other(value: Any) -> str:
    text = _fmt(value, ".2f")
    return text + "*" if isinstance(value, float) and value > NOISY_OTHER_CORES else text + " "


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def render(figures: dict[str, Any]) -> str:
    machine = figures["machine"]
    run = figures["run"]
    lines = [
        "",
        f"streamboss bench {run['id']} ({'quick' if run['quick'] else 'full'}): "
        f"{machine['nproc']} CPUs ({machine['cpu']}), RabbitMQ {machine['rabbitmq']}, "
        f"Python {machine['python']}, pika {machine['pika']}, load {machine['load_1min_at_start']}"
        f" at start, {machine['wall_s']} s",
    ]
    if figures["rows"]:
        lines += _throughput(figures)
    lines += _demand(figures.get("demand") or {})
    lines += _scale(figures.get("scale") or {})
    lines += _storage(figures.get("storage") or {})
    if figures["failures"]:
        lines += ["", "Problems:"] + [f"  {note}" for note in figures["failures"]]
    return "\n".join(lines)


def _throughput(figures: dict[str, Any]) -> list[str]:
    run = figures["run"]
    lines = [
        "",
        f"Throughput: N persistent 100-byte messages prefilled (untimed); window = first to "
        f"N-th output in the capture queue; median of {run['rounds']} round(s) [min-max]. "
        "CPU in cores over the window; 'other' = everything but relay, broker and harness.",
    ]
    header = (f"{'row':47} {'N':>7} {'msg/s':>7} {'[min-max]':>15} {'x plain':>7} "
              f"{'x naive':>7} {'x spawn':>7} {'relay':>6} {'us/msg':>6} {'broker':>6} "
              f"{'us/msg':>6} {'other':>6}")
    lines += [header, "-" * len(header)]
    plain, naive, spawn = (_rate(figures, k) for k in ("plain", "naive", "spawn"))
    for key, row in figures["rows"].items():
        s = row["summary"]
        rate = s.get("rate", math.nan)
        spread = (f"[{s['rate_min']:,.0f}-{s['rate_max']:,.0f}]"
                  if "rate_min" in s and s["succeeded"] > 1 else "")
        x_spawn = rate / spawn if key in ("spawn", "pm") or key.startswith("pm-") else math.nan
        failed = s["rounds"] - s["succeeded"]
        lines.append(
            f"{row['label'][:47]:47} {row['n']:>7,} {_fmt(rate, ',.0f', 'FAILED'):>7} "
            f"{spread:>15} {_fmt(rate / plain, '.2f'):>7} {_fmt(rate / naive, '.2f'):>7} "
            f"{_fmt(x_spawn, '.2f'):>7} {_fmt(s.get('relay_cores'), '.2f'):>6} "
            f"{_fmt(s.get('relay_us_per_msg'), '.0f'):>6} {_fmt(s.get('broker_cores'), '.2f'):>6} "
            f"{_fmt(s.get('broker_us_per_msg'), '.0f'):>6} {_other(s.get('other_cores')):>6}"
            + (f"  ({failed} round(s) failed)" if failed else ""))
    if figures["latency"]:
        lines += [
            "",
            "Latency: publisher process at a fixed rate -> relay -> harness consumer; warm-up "
            f"dropped; ms; median of {run['latency_rounds']} round(s). CPU at that rate.",
        ]
        header = (f"{'row':47} {'rate/s':>7} {'msgs':>6} {'p50':>6} {'p99':>6} {'p99.9':>6} "
                  f"{'max':>6} {'lost':>5} {'relay us/msg':>12} {'other':>6}")
        lines += [header, "-" * len(header)]
        for entry in figures["latency"]:
            label = figures["rows"][entry["row"]]["label"]
            if "p99_ms" not in entry:
                lines.append(f"{label[:47]:47} {entry['rate']:>7.0f}  FAILED: {entry.get('error')}")
                continue
            lines.append(
                f"{label[:47]:47} {entry['rate']:>7.0f} {entry['n']:>6} "
                f"{_fmt(entry['p50_ms'], '.2f'):>6} {_fmt(entry['p99_ms'], '.2f'):>6} "
                f"{_fmt(entry['p999_ms'], '.2f'):>6} {_fmt(entry['max_ms'], '.1f'):>6} "
                f"{entry['lost']:>5} {_fmt(entry.get('relay_us_per_msg'), '.0f'):>12} "
                f"{_other(entry.get('other_cores')):>6}")
    lines += ["", f"* other work used more than {NOISY_OTHER_CORES} cores during that window "
              "(median); the 2 cores are shared, so treat that figure with care."]
    lines += ["", "Targets (benchmark targets, not test assertions):"]
    for target in figures["targets"]:
        rounds = target["by_round"]
        spread = (f"  [rounds {min(rounds):.2f}-{max(rounds):.2f}]" if len(rounds) > 1 else "")
        lines.append(f"  {target['verdict']:4}  {target['target']:66} "
                     f"{_fmt(target['ratio'], '.2f', 'n/a'):>6}{spread}")
    extra = figures["ratios"]
    others = [f"{name} {value:.2f}" for name, value in extra.items()
              if name not in {t[0] for t in TARGETS} and not math.isnan(value)]
    if others:
        lines.append("  other ratios: " + ", ".join(others))
    return lines


def _spread(figure: dict[str, float]) -> str:
    if not figure:
        return f"{'-':>18}"
    return f"{figure['min']:5.2f} {figure['median']:5.2f} {figure['max']:5.2f}"


DEMAND_LABELS = {"demand": "1 operation", "demand-chain": "3-operation chain (wakes backwards)"}


def _demand(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    policy = ", ".join(f"{k} {v}" for k, v in section["policy"].items())
    lines = [
        "",
        f"Demand reaction (manager; `{section['exec']}` per-message, policy {policy}): consumer "
        "attaches to the last output, one message published at the head; seconds, "
        f"min median max of {section['repeats']} sample(s). 'agents' = attach -> status shows "
        "every operation's agent running (100 ms polls); 'output' = attach -> output "
        "received; 'zero' = detach -> status shows no agents.",
    ]
    header = (f"{'row':40} {'ok':>5}  {'agents (min med max)':>20}  {'output (min med max)':>20}  "
              f"{'zero (min med max)':>20}")
    lines += [header, "-" * len(header)]
    for key, label in DEMAND_LABELS.items():
        entry = section.get(key)
        if not entry:
            continue
        ok = f"{entry['succeeded']}/{len(entry['runs'])}"
        lines.append(f"{label:40} {ok:>5}  {_spread(entry['agent_s']):>20}  "
                     f"{_spread(entry['reaction_s']):>20}  {_spread(entry['zero_s']):>20}")
    if "error" in section:
        lines.append(f"  FAILED: {section['error']}")
    return lines


def _scale(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    policy = ", ".join(f"{k} {v}" for k, v in section["policy"].items())
    lines = [
        "",
        f"Scale-out (manager; policy {policy}; 'max 1' = the same with max 1): N messages "
        "waiting in the operation queue, then a consumer attaches; seconds from the attach "
        "to the first agent running, to max agents running, to the first and the N-th "
        "output; rate = outputs/s from first to N-th output; CPU in cores over attach -> "
        f"N-th output; median of {section['rounds']} round(s).",
    ]
    header = (f"{'workload':38} {'max':>3} {'N':>7} {'agent1':>6} {'maxag':>6} {'peak':>4} "
              f"{'out1':>6} {'drained':>7} {'msg/s':>7} {'x max1':>6} {'agents':>6} "
              f"{'broker':>6} {'other':>6}")
    lines += [header, "-" * len(header)]
    for key, entry in section.items():
        if not isinstance(entry, dict) or "scaled" not in entry:
            continue
        single_rate = entry["single"].get("rate", math.nan)
        for which, limit in (("scaled", section["policy"]["max"]), ("single", 1)):
            s = entry[which]
            rate = s.get("rate", math.nan)
            failed = s["rounds"] - s["succeeded"]
            lines.append(
                f"{(entry['label'] if which == 'scaled' else '')[:38]:38} {limit:>3} "
                f"{entry['n']:>7,} {_fmt(s.get('first_agent_s'), '.2f'):>6} "
                f"{_fmt(s.get('max_agents_s'), '.2f'):>6} {_fmt(s.get('peak_agents'), '.0f'):>4} "
                f"{_fmt(s.get('first_output_s'), '.2f'):>6} {_fmt(s.get('drained_s'), '.1f'):>7} "
                f"{_fmt(rate, ',.0f', 'FAILED'):>7} {_fmt(rate / single_rate, '.2f'):>6} "
                f"{_fmt(s.get('agents_cores'), '.2f'):>6} {_fmt(s.get('broker_cores'), '.2f'):>6} "
                f"{_other(s.get('other_cores')):>6}"
                + (f"  ({failed} round(s) failed)" if failed else ""))
        for which in ("scaled_runs", "single_runs"):
            for run in entry[which]:
                if run.get("timeline"):
                    lines.append(f"    {key} max {run['max']} round {run['round']}, agents "
                                 f"running[+draining] from the attach: {render_timeline(run)}")
    lines.append(f"  * other work used more than {NOISY_OTHER_CORES} cores during that run.")
    if "error" in section:
        lines.append(f"  FAILED: {section['error']}")
    return lines


def render_timeline(run: dict[str, Any]) -> str:
    """``0.5s 4, 6.1s 3, | detach 9.0s |, 11.2s 0+3d, ...``: running[+draining]."""
    parts: list[str] = []
    detach = run.get("detached_s")
    for t, _desired, running, draining, _backlog in run.get("timeline", []):
        if detach is not None and t >= detach:
            parts.append(f"| detach {detach:.1f}s |")
            detach = None
        parts.append(f"{t:.1f}s {running}" + (f"+{draining}d" if draining else ""))
    return ", ".join(parts).replace(", |", " |").replace("|, ", "| ")


def _storage(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    lines = ["", "Object storage, archive and replay (see tools/bench/storage.py for what is "
             "timed):"]
    objects = section.get("objects")
    if objects:
        if "error" in objects:
            lines.append(f"  objects: FAILED: {objects['error']}")
        else:
            lines.append(
                f"  round trip of {objects['size'] // 2**20} MiB on moto S3: streamboss "
                f"{objects['ours_mb_s']:.0f} MiB/s, raw boto3 {objects['raw_mb_s']:.0f} MiB/s "
                f"-> {objects['ratio']:.2f} x (median of {len(objects['ours_s'])})")
    for entry in section.get("rss") or []:
        if "error" in entry:
            lines.append(f"  peak RSS ({entry['store']}): FAILED: {entry['error']}")
            continue
        lines.append(
            f"  peak RSS streaming {entry['size'] // 2**20} MiB via {entry['store']}: "
            f"stream-file {entry['uploader_mb']:.0f} MB, agent (sha256sum) "
            f"{entry['agent_mb']:.0f} MB; upload {entry['upload_s']:.1f} s, digest out "
            f"after {entry['end_to_end_s']:.1f} s")
    archive = section.get("archive")
    if archive:
        if "error" in archive:
            lines.append(f"  archive/replay: FAILED: {archive['error']}")
        else:
            lines.append(
                f"  archive of {archive['n']:,} messages: ingest (plain publisher) "
                f"{archive['ingest_rate']:,.0f} msg/s, archiver drains "
                f"{archive['archive_rate']:,.0f} msg/s -> {archive['archive_vs_ingest']:.2f} x "
                f"ingest; {archive['segments']} segment(s), compression "
                f"{archive['compression']:.1f}:1")
            if "replay_rate" in archive:
                lines.append(
                    f"  replay of {archive['n']:,}: {archive['replay_rate']:,.0f} msg/s, "
                    f"plain publisher {archive['raw_publish_rate']:,.0f} msg/s -> "
                    f"{archive['replay_vs_raw']:.2f} x (median of {len(archive['replay_s'])})")
    for (part, key), text, comparison, threshold in STORAGE_TARGETS:
        entries = section.get(part)
        values = [e.get(key) for e in (entries if isinstance(entries, list) else [entries])
                  if isinstance(e, dict) and e.get(key) is not None]
        if not values:
            continue
        worst = min(values) if comparison == ">=" else max(values)
        met = worst >= threshold if comparison == ">=" else worst < threshold
        lines.append(f"  target: {text}: {worst:.2f} {'PASS' if met else 'MISS'}")
    return lines
