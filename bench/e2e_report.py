"""The ratios and the printed table of `bench.e2e` (figures from one run only)."""

from __future__ import annotations

from typing import Any


def _ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("nan")


def ratios(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Node windows/s over raw ONNX Runtime's: the better of 1 and 2 intra-op threads
    (`vs_best_raw`) and two parallel 1-thread calls (`vs_parallel_raw`), all from `report`."""
    best = report["raw"]["best_intra_op"]["windows_per_s"]
    parallel = report["raw"]["best_parallel"]["windows_per_s"]
    rows: dict[str, dict[str, float]] = {}

    def add(name: str, phase: dict[str, Any]) -> None:
        rate = phase["windows_per_s"]
        rows[name] = {
            "windows_per_s": rate,
            "vs_best_raw": _ratio(rate, best),
            "vs_parallel_raw": _ratio(rate, parallel),
        }

    for encoding, phase in report["node"]["throughput"].items():
        add(f"node_{encoding}", phase)
    for encoding, phase in report["node"]["flood"].items():
        add(f"node_flood_{encoding}", phase)
    for group in report["groups"]:
        for encoding, phase in group["throughput"].items():
            add(f"group{group['nodes']}_{encoding}", phase)
    return rows


def _ms(p: dict[str, float]) -> str:
    return f"p50 {p['p50']:7.2f}  p95 {p['p95']:7.2f}  p99 {p['p99']:7.2f}  max {p['max']:7.2f}"


def _phase_line(label: str, phase: dict[str, Any], ratio: dict[str, float] | None) -> str:
    line = f"{label:<28} {phase['received']:>6}/{phase['sent']:<6} {phase['windows_per_s']:8.0f}/s"
    if ratio is not None:
        line += (
            f"  {ratio['vs_best_raw']:5.2f}x best raw  {ratio['vs_parallel_raw']:5.2f}x parallel"
        )
    if phase["duplicates"]:
        line += f"  ({phase['duplicates']} served twice)"
    return line


def print_report(r: dict[str, Any]) -> None:
    """The human-readable table on stdout."""
    raw, machine, rows = r["raw"], r["machine"], r["ratios"]
    print(
        f"\n== bench.e2e {r['date']}: {r['model']['description']}, {machine['cpu_count']} CPUs, "
        f"load {machine['load_average'][0]:.2f} -> {machine['load_average_end'][0]:.2f}, "
        f"MQTT {r['settings']['mqtt_protocol']} =="
    )
    print(f"{'raw ONNX Runtime, batch 1, windows/s':<40} {'before':>8} {'after':>8}")
    before, after = raw["before"], raw["after"]
    for key, label in (
        ("batch1_1thread", "1 intra-op thread"),
        ("batch1_2threads", "2 intra-op threads"),
        ("parallel_2x1thread_shared_session", "2 x 1-thread calls at once, 1 session"),
        ("parallel_2x1thread_two_sessions", "2 x 1-thread calls at once, 2 sessions"),
        ("batch8_dynamic", "batch 8 (free batch dimension)"),
    ):
        if before[key] is not None:
            rates = (before[key]["windows_per_s"], after[key]["windows_per_s"])
            print(f"{label:<40} {rates[0]:8.0f} {rates[1]:8.0f}")
    call = before["batch1_1thread"]["call_ms"]
    print(f"{'1-thread call ms (before)':<28} {_ms(call)}")
    print(
        f"best raw {raw['best_intra_op']['windows_per_s']:.0f}/s "
        f"({raw['best_intra_op']['threads']} thread(s)), "
        f"best parallel {raw['best_parallel']['windows_per_s']:.0f}/s"
    )
    node = r["node"]
    print(f"\none node, workers {node['workers']}:")
    paced = node["paced"]
    print(_phase_line(f"paced {paced['offered_per_s']:g}/s JSON", paced, None))
    print(f"{'  publish -> result ms':<28} {_ms(paced['e2e_ms'])}")
    print(f"{'  node-side ms':<28} {_ms(paced['node_ms'])}")
    for encoding, phase in node["throughput"].items():
        print(_phase_line(f"throughput {encoding}", phase, rows[f"node_{encoding}"]))
        print(f"{'  publish -> result ms':<28} {_ms(phase['e2e_ms'])}")
    for encoding, phase in node["flood"].items():
        print(_phase_line(f"flood {encoding} (QoS 0)", phase, rows[f"node_flood_{encoding}"]))
    rss = node["rss_mb"]
    print(
        f"RSS {rss['rss']:.0f} MiB, peak {rss['peak']:.0f} MiB "
        f"(after start {node['rss_mb_after_start']['rss']:.0f} MiB)"
    )
    sweep = r["sweep"]
    if sweep["points"]:
        print(f"\nrate sweep (JSON, node max {sweep['node_max_per_s']:.0f}/s):")
        for point in sweep["points"]:
            print(
                f"{point['fraction']:4.2f} x {point['offered_per_s']:7.0f}/s -> "
                f"{point['windows_per_s']:7.0f}/s {point['received']:>6}/{point['sent']:<6} "
                f"{_ms(point['e2e_ms'])}"
            )
    for group in r["groups"]:
        print(
            f"\n{group['nodes']} node(s) on share group {group['share_group']} ({group['mode']}):"
        )
        for encoding, phase in group["throughput"].items():
            print(
                _phase_line(
                    f"throughput {encoding}", phase, rows[f"group{group['nodes']}_{encoding}"]
                )
            )
            split = ", ".join(
                f"{n.rsplit('-', 1)[-1]} {c}" for n, c in sorted(phase["served_by"].items())
            )
            print(f"{'  served by':<28} {split}")
        peaks = ", ".join(f"{v['peak']:.0f}" for v in group["rss_mb"].values())
        print(f"{'  peak RSS MiB':<28} {peaks}")
