"""Operator commands: `imu-fleet publish|rollout|status|nodes|unpin|controller|pause|resume|
abort|rollback`.

Each opens one MQTT session, lets the retained fleet state arrive, acts, and prints for people.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

from fleet.distribution import publish_bundle
from fleet.rollout.controller import Controller, RolloutError, send_command
from fleet.rollout.view import FleetView, NodeView, behind_down_link
from schemas.control import NodeHealth, NodeRolloutState, RolloutRecord, RolloutState
from schemas.messages import NodeModelState

SETTLE_S = 1.5
"""Time for retained node, artifact and rollout messages to arrive after subscribing."""


@contextmanager
def controller_session(args: argparse.Namespace, *, progress: bool = False) -> Iterator[Controller]:
    """A connected controller with the retained fleet state loaded."""
    controller = Controller.connect(
        args.broker,
        protocol=args.mqtt_protocol,
        sign_key=getattr(args, "sign_key", None),
        trust_key=getattr(args, "trust_key", None),
        progress=_print_event if progress else None,
    )
    try:
        time.sleep(SETTLE_S)
        yield controller
    finally:
        controller.close()


def _print_event(record: RolloutRecord, event: str) -> None:
    counts: dict[str, int] = {}
    for outcome in record.nodes.values():
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {record.rollout_id} [{record.state}] {event}  ({summary})", flush=True)


def cmd_publish(args: argparse.Namespace) -> int:
    """`imu-fleet publish BUNDLE`."""

    def progress(done: int, total: int) -> None:
        print(f"\rchunks {done}/{total}", end="", file=sys.stderr, flush=True)

    manifest = publish_bundle(
        args.bundle,
        args.broker,
        chunk_size=args.chunk_size,
        url=args.url,
        protocol=args.mqtt_protocol,
        progress=progress,
        sign_key=args.sign_key,
    )
    print(
        f"\npublished {manifest.name} {manifest.version}: {manifest.bundle_size} bytes in "
        f"{len(manifest.chunks)} retained chunks, sha256 {manifest.bundle_sha256[:16]}..."
    )
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """`imu-fleet rollout NAME VERSION`: plan and drive a rollout, live (or `--detach`)."""
    with controller_session(args, progress=True) as controller:
        pins = controller.pins(args.group)
        if pins and args.clear_pins:
            controller.unpin(sorted(pins))
            print(f"cleared the node-level pins of {len(pins)} nodes: {', '.join(sorted(pins))}")
        gates = None
        if not args.no_gates:
            gates = controller.default_gates(
                controller.targets(args.group),
                soak_s=args.soak,
                max_error_rate=args.max_error_rate,
                max_p95_ratio=args.max_p95_ratio,
                p95_floor_ms=args.p95_floor_ms,
                min_results_ratio=args.min_results_ratio,
            )
        record = controller.start(
            args.name,
            args.version,
            group=args.group,
            canary=args.canary,
            waves=[int(p) for p in args.waves.split(",")],
            max_failures=args.max_failures,
            wave_timeout_s=args.wave_timeout,
            gates=gates,
            by_site=args.by_site,
            site_hold_s=args.site_hold,
        )
        left_out = {n: f for n, f in pins.items() if n not in record.nodes}
        if left_out and not args.clear_pins:
            print(
                f"warning: {len(left_out)} nodes are pinned by a node-level desired state and "
                "stay on it whatever this rollout does (--clear-pins, or `imu-fleet unpin`):",
                file=sys.stderr,
            )
            for node_id, pin in sorted(left_out.items()):
                by = f" by {pin.rollout_id}" if pin.rollout_id else ""
                print(f"  {node_id}: {pin.version} set {_ago(pin.issued_at)}{by}", file=sys.stderr)
        if args.detach:
            print(
                f"{record.rollout_id}: planned; a running `imu-fleet controller` drives it "
                f"(`imu-fleet status {record.rollout_id}`)"
            )
            return 0
        final = controller.run(record)
    print(format_record(final, detailed=True))
    return 0 if final.state is RolloutState.SUCCEEDED else 1


def cmd_control(args: argparse.Namespace) -> int:
    """`imu-fleet pause|resume|abort|rollback ROLLOUT`."""
    with controller_session(args, progress=True) as controller:
        record = controller.record(args.rollout)
        if record is None:
            msg = f"no rollout {args.rollout!r} on the broker (see `imu-fleet status`)"
            raise RolloutError(msg)
        active = record.state in (RolloutState.RUNNING, RolloutState.PAUSED)
        if not active and args.command != "rollback":
            print(f"{record.rollout_id} is {record.state}: nothing to {args.command}")
            return 1
        if args.command in ("rollback", "resume"):  # refuse now, not after a half-done job
            moved = [n for n, o in record.nodes.items() if o.state is not NodeRolloutState.PENDING]
            controller.require_key_for(
                moved if args.command == "rollback" else list(record.nodes), args.command
            )
        if active and controller.is_driven(record):  # a live controller is running it: ask
            send_command(controller.session, record, args.command, controller.signing_key)
            print(
                f"{record.rollout_id}: asked the running controller to {args.command}; "
                f"`imu-fleet status {record.rollout_id}` shows what the nodes confirm"
            )
            return 0
        final = controller.take_over(record, args.command)  # its controller is gone: act here
        print(f"{final.rollout_id}: {final.state}")
        if args.command == "rollback":
            print(format_record(final, detailed=True))
            return _rollback_verdict(final)
        return 0 if final.state is not RolloutState.FAILED else 1


def _rollback_verdict(record: RolloutRecord) -> int:
    """Say which nodes confirmed the rollback; exit 1 unless all of them did."""
    back = [n for n, o in record.nodes.items() if o.state is NodeRolloutState.ROLLED_BACK]
    missing = [n for n, o in record.nodes.items() if o.state is NodeRolloutState.ROLLING_BACK]
    print(f"rolled back (each node reported its previous model active): {len(back)}")
    if missing:
        print(f"NOT confirmed ({len(missing)}), still asked to go back: {', '.join(missing)}")
        return 1
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    """`imu-fleet unpin NODE... | --all [--group G]`."""
    if bool(args.nodes) == bool(args.all):
        print("give node ids, or --all (with --group to limit it)", file=sys.stderr)
        return 2
    with controller_session(args) as controller:
        targets = sorted(controller.pins(args.group)) if args.all else list(args.nodes)
        if not targets:
            print("no node follows a node-level desired state")
            return 0
        controller.unpin(targets)
    print(f"cleared the node-level desired state of {len(targets)} nodes: {', '.join(targets)}")
    print(
        "they follow their group's (or the fleet's) desired state again; "
        "`imu-fleet nodes` shows what each follows"
    )
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    """`imu-fleet controller`: the long-running service (fleet/rollout/service.py)."""
    import signal  # noqa: PLC0415

    from fleet.rollout.service import ControllerService, serve  # noqa: PLC0415

    service = ControllerService(
        args.broker,
        protocol=args.mqtt_protocol,
        name=args.name,
        sign_key=args.sign_key,
        trust_key=args.trust_key,
        poll_s=args.poll,
    )
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: service.request_stop())
    print(f"controller {service.controller_id} running; SIGTERM stops it", flush=True)
    return serve(service, args.listen, args.token_file)


def _ago(stamp: float) -> str:
    return f"{max(0.0, time.time() - stamp):.0f} s ago"


def cmd_status(args: argparse.Namespace) -> int:
    """`imu-fleet status [ROLLOUT] [--json]`."""
    with controller_session(args) as controller:
        records = controller.records()
        if args.rollout:
            records = [r for r in records if r.rollout_id == args.rollout]
            if not records:
                print(f"no rollout {args.rollout!r}", file=sys.stderr)
                return 1
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            **r.model_dump(mode="json"),
                            "failures": r.failures,
                            "sites": Sites.of_view(controller.view, r).summary(r),
                        }
                        for r in records
                    ],
                    indent=2,
                )
            )
            return 0
        refused = [r for r in controller.book.refused() if r.record is not None]
        if args.rollout:
            refused = [r for r in refused if r.record and r.record.rollout_id == args.rollout]
        if not records and not refused:
            print("no rollouts on the broker")
        for record in records:
            active = record.state in (RolloutState.RUNNING, RolloutState.PAUSED)
            driven = controller.is_driven(record) if active else None
            sites = Sites.of_view(controller.view, record)
            print(format_record(record, detailed=bool(args.rollout), driven=driven, sites=sites))
        for forged in refused:
            print(
                f"REFUSED {forged.topic}: {forged.reason}; no controller with the fleet key acts "
                "on it (a fleet login without the key wrote it, or it was altered): clear it with "
                f"`mosquitto_pub -r -n -t {forged.topic}` after finding out who wrote it"
            )
    return 1 if refused else 0


@dataclass(frozen=True, slots=True)
class Sites:
    """Where a rollout's nodes are: each node's site (None: it names none) and each site's
    link, from the fleet broker's view."""

    of: dict[str, str | None]
    links: dict[str, bool]

    @classmethod
    def of_view(cls, view: FleetView, record: RolloutRecord) -> Sites:
        """The sites of `record`'s nodes as `view` knows them."""
        return cls(
            {n: (v.site if (v := view.get(n)) else None) for n in record.nodes}, view.links()
        )

    def named(self) -> bool:
        return any(self.of.values())

    def summary(self, record: RolloutRecord) -> dict[str, dict[str, object]]:
        """Per site (`-` for nodes that name none): its link and its nodes' states."""
        found: dict[str, dict[str, object]] = {}
        for node_id, outcome in record.nodes.items():
            site = self.of.get(node_id) or "-"
            entry = found.setdefault(
                site,
                {"link": None if site == "-" else _link_word(self.links.get(site)), "nodes": {}},
            )
            states = cast("dict[str, int]", entry["nodes"])
            state = "held" if (outcome.error or "").startswith("held:") else str(outcome.state)
            states[state] = states.get(state, 0) + 1
        return dict(sorted(found.items(), key=lambda kv: (kv[0] == "-", kv[0])))  # none last


def _site_line(site: str, entry: dict[str, object]) -> str:
    states = cast("dict[str, int]", entry["nodes"])
    counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
    where = "no site" if site == "-" else f"site {site} (link {entry['link']})"
    return f"  {where}: {counts}"


def format_record(
    record: RolloutRecord,
    *,
    detailed: bool,
    driven: bool | None = None,
    sites: Sites | None = None,
) -> str:
    """A rollout as text: one line, or a line per node (with the health gates' figures).

    `driven` (for running or paused rollouts) says whether a live controller drives it; when
    not, the line tells the operator how to take it over. With `sites` naming any, a line per
    site follows (its link and its nodes' states), and the detailed nodes are grouped by site.
    """
    age = time.time() - record.updated_at
    gates = f"  soak {record.gates.soak_s:g} s" if record.gates else "  no gates"
    lines = [
        f"{record.rollout_id}  {record.state:<11} {record.desired.name} {record.desired.version}  "
        f"wave {min(record.wave + 1, len(record.waves))}/{len(record.waves)}  "
        f"failures {record.failures}/{record.max_failures} allowed{gates}  "
        f"updated {age:.0f} s ago" + (f"  ({record.reason})" if record.reason else "")
    ]
    if driven is False:
        lines[0] += f"  [no live controller: imu-fleet resume {record.rollout_id}]"
    by_site = sites is not None and sites.named()
    summary = sites.summary(record) if sites is not None and by_site else {}
    if not detailed:
        lines += [_site_line(site, entry) for site, entry in summary.items()]
        return "\n".join(lines)
    site_of = sites.of if sites is not None and by_site else {}
    last: str | None = None
    for node, o in sorted(
        record.nodes.items(), key=lambda kv: (site_of.get(kv[0]) or "~", kv[1].wave, kv[0])
    ):
        if by_site and (site := site_of.get(node) or "-") != last:
            lines.append(_site_line(site, summary[site]))
            last = site
        mark = " FAILED" if o.failed and o.state is not NodeRolloutState.FAILED else ""
        lines.append(f"  {node:<24} wave {o.wave + 1:<3} {o.state:<12}{mark} {o.error or ''}")
        if o.health is not None:
            lines.append(f"  {'':<24} {_health_line(o.health)}")
    return "\n".join(lines)


def _health_line(health: NodeHealth) -> str:
    def pair(value: float | None, reference: float | None, form: str) -> str:
        shown = "-" if value is None else format(value, form)
        return shown + ("" if reference is None else f" (ref {format(reference, form)})")

    verdict = "passed" if health.passed else "failed"
    return (
        f"gates {verdict}: {health.soak_samples} reports, {health.windows} windows, errors/window "
        f"{pair(health.error_rate, health.reference_error_rate, '.3f')}, p95 ms "
        f"{pair(health.p95_ms, health.reference_p95_ms, '.1f')}, results/window "
        f"{pair(health.results_ratio, health.reference_results_ratio, '.2f')}"
    )


def cmd_nodes(args: argparse.Namespace) -> int:
    """`imu-fleet nodes [--json]`: one line (or object) per node; `nodes forget ID...`."""
    if args.forget:
        return _forget(args)
    with controller_session(args) as controller:
        time.sleep(args.wait)  # telemetry is periodic, not retained
        nodes, links = controller.view.nodes(), controller.view.links()
    if args.json:
        print(json.dumps([_node_json(view, links) for view in nodes], indent=2))
        return 0
    print(format_nodes(nodes, links))
    return 0


SITE_UNREACHABLE = "site unreachable"
"""A node at a site whose bridge to the fleet broker is down: its last status is stale."""


def node_state(view: NodeView, links: dict[str, bool]) -> str:
    """online, offline, stopped, stopping, or `site unreachable` (its site's link is down: what
    the fleet broker holds of it may be stale, and it may well be serving its site)."""
    if behind_down_link(view, links):
        return SITE_UNREACHABLE
    return view.status.state.value if view.status else "unknown"


def _forget(args: argparse.Namespace) -> int:
    from fleet.rollout.retire import forget  # noqa: PLC0415

    action, *node_ids = args.forget
    if action != "forget" or not node_ids:
        print("usage: imu-fleet nodes forget ID [ID ...]", file=sys.stderr)
        return 2
    with controller_session(args) as controller:
        done = forget(controller, args.broker, node_ids, args.node_credentials, args.node_broker)
    with controller_session(args) as controller:  # read back what the broker still holds
        left = [node_id for node_id in done.cleared if controller.view.get(node_id) is not None]
    for node_id in done.cleared:
        if node_id not in left:
            print(f"forgotten: {node_id} (status, model state and pin cleared, read back)")
    for node_id in left:
        print(f"NOT confirmed: {node_id} still has a retained status or model state")
    for node_id, why in done.refused.items():
        print(f"left as is: {node_id}: {why}")
    if done.cleared and not left:
        print("revoke its login too: imu-fleet pki remove site/ node ID, then SIGHUP the broker")
    return 0 if not left and not done.refused else 1


def _node_json(view: NodeView, links: dict[str, bool]) -> dict[str, object]:
    model, telemetry = view.model, view.telemetry
    following = model.following if model else None
    running = model.active.version if model and model.active else None
    drift = None
    if following is not None and running != following.version:
        drift = f"wants {following.version}"
    return {
        "node_id": view.node_id,
        "online": view.online,
        "state": node_state(view, links),
        "site": view.site,
        "site_link": None if view.site is None else _link_word(links.get(view.site)),
        "group": view.group,
        "model": model.active.model_dump(mode="json") if model and model.active else None,
        "model_state": model.state.value if model else None,
        "backend": model.backend if model else None,
        "windows_per_s": telemetry.windows_per_s if telemetry else None,
        "p95_ms": telemetry.latency_ms.p95 if telemetry else None,
        "follows": following.model_dump(mode="json") if following else None,
        "pinned": following is not None and following.scope == "node",
        "drift": drift,
        "last_error": model.last_error if model else None,
        "stale_since": model.stale_since if model else None,
        "stale_reason": model.stale_reason if model else None,
    }


def _link_word(up: bool | None) -> str:
    return "unknown" if up is None else "up" if up else "DOWN"


def format_nodes(nodes: list[NodeView], links: dict[str, bool] | None = None) -> str:
    """The nodes table, grouped by site when nodes say theirs (docs/scaling.md, many sites)."""
    links = links or {}
    by_site = any(view.site for view in nodes)
    site_column = f" {'site':<12}" if by_site else ""
    lines = [
        f"{'node':<24}{site_column} {'online':<7} {'group':<12} {'model':<28} {'state':<11} "
        f"{'backend':<8} {'win/s':>7} {'p95 ms':>7}  {'follows (node-level = a pin)':<24} drift"
    ]
    drifting = stale = 0
    for view in sorted(nodes, key=lambda v: (v.site or "", v.node_id)):
        model = view.model
        active = f"{model.active.name} {model.active.version}" if model and model.active else "-"
        telemetry = view.telemetry
        rate = f"{telemetry.windows_per_s:.1f}" if telemetry else "-"
        p95 = telemetry.latency_ms.p95 if telemetry and telemetry.latency_ms.p95 else None
        follows, drift = _follows(model)
        drifting += drift != "-"
        if model is not None and model.stale_since is not None:
            stale += 1
            drift = f"{drift}; STALE since {_ago(model.stale_since)}"
        online = "yes" if view.online else "no"
        if node_state(view, links) == SITE_UNREACHABLE:
            online = SITE_UNREACHABLE
        site = f" {view.site or '-':<12}" if by_site else ""
        lines.append(
            f"{view.node_id:<24}{site} {online:<7} {view.group or '-':<12} "
            f"{active:<28} {model.state if model else '-':<11} "
            f"{(model.backend or '-') if model else '-':<8} {rate:>7} "
            f"{f'{p95:.1f}' if p95 is not None else '-':>7}  {follows:<24} {drift}"
        )
    lines.append(
        f"{len(nodes)} nodes, {sum(v.online for v in nodes)} online, {drifting} not running "
        "what they follow; follows = the desired state a node obeys (node-level = a pin)"
    )
    sites = sorted({view.site for view in nodes if view.site} | set(links))
    if sites:
        unreachable = sum(node_state(v, links) == SITE_UNREACHABLE for v in nodes)
        behind = f"; {unreachable} nodes behind a down link show their last known state"
        states = ", ".join(f"{site} {_link_word(links.get(site))}" for site in sites)
        lines.append(f"sites (bridge to this broker): {states}{behind if unreachable else ''}")
    if stale:
        lines.append(
            f"{stale} nodes have a STALE control plane: what they follow expired without a "
            "renewal (is `imu-fleet controller` running? docs/operations.md#control-plane-stale)"
        )
    return "\n".join(lines)


def _follows(model: NodeModelState | None) -> tuple[str, str]:
    """(which desired state the node follows, and its drift from it) for the nodes table."""
    following = model.following if model else None
    if model is None or following is None:
        return "- (nothing set)", "-"
    where = f"{following.scope}" + (f" {following.target}" if following.scope == "group" else "")
    signed = "" if following.key_id else " unsigned"
    by = f" by {following.rollout_id}" if following.rollout_id else ""
    follows = f"{where}: {following.version}{signed}{by}, set {_ago(following.issued_at)}"
    running = model.active.version if model.active else None
    drift = "-" if running == following.version else f"wants {following.version}"
    if model.state == "failed" and model.last_error:
        drift += f" (refused: {model.last_error[:60]})"
    return follows, drift
