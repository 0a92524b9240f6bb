"""Operator commands: `imu-fleet publish|rollout|status|nodes|pause|resume|abort|rollback`.

Each opens one MQTT session, lets the retained fleet state arrive, acts, and prints for people.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fleet.distribution import publish_bundle
from fleet.rollout.controller import Controller, RolloutError, send_command
from fleet.rollout.view import NodeView
from schemas.messages import NodeModelState, RolloutRecord, RolloutState

SETTLE_S = 1.5
"""Time for retained node, artifact and rollout messages to arrive after subscribing."""


@contextmanager
def controller_session(args: argparse.Namespace, *, progress: bool = False) -> Iterator[Controller]:
    """A connected controller with the retained fleet state loaded."""
    controller = Controller.connect(
        args.broker,
        protocol=args.mqtt_protocol,
        sign_key=getattr(args, "sign_key", None),
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
        args.bundle, args.broker, chunk_size=args.chunk_size, url=args.url,
        protocol=args.mqtt_protocol, progress=progress,
    )  # fmt: skip
    print(
        f"\npublished {manifest.name} {manifest.version}: {manifest.bundle_size} bytes in "
        f"{len(manifest.chunks)} retained chunks, sha256 {manifest.bundle_sha256[:16]}..."
    )
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """`imu-fleet rollout NAME VERSION`: plan and drive a rollout, live."""
    with controller_session(args, progress=True) as controller:
        record = controller.start(
            args.name,
            args.version,
            group=args.group,
            canary=args.canary,
            waves=[int(p) for p in args.waves.split(",")],
            max_failures=args.max_failures,
            wave_timeout_s=args.wave_timeout,
        )
        final = controller.run(record)
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
        if active and controller.is_driven(record):  # a live controller is running it: ask
            send_command(controller.session, record, args.command)
            print(f"{record.rollout_id}: asked the running controller to {args.command}")
            return 0
        final = controller.take_over(record, args.command)  # its controller is gone: act here
        print(f"{final.rollout_id}: {final.state}")
        return 0 if final.state is not RolloutState.FAILED else 1


def cmd_status(args: argparse.Namespace) -> int:
    """`imu-fleet status [ROLLOUT]`."""
    with controller_session(args) as controller:
        records = controller.records()
        if args.rollout:
            records = [r for r in records if r.rollout_id == args.rollout]
            if not records:
                print(f"no rollout {args.rollout!r}", file=sys.stderr)
                return 1
        if not records:
            print("no rollouts on the broker")
        for record in records:
            active = record.state in (RolloutState.RUNNING, RolloutState.PAUSED)
            driven = controller.is_driven(record) if active else None
            print(format_record(record, detailed=bool(args.rollout), driven=driven))
    return 0


def format_record(record: RolloutRecord, *, detailed: bool, driven: bool | None = None) -> str:
    """A rollout as text: one line, or a line per node.

    `driven` (for running or paused rollouts) says whether a live controller drives it; when
    not, the line tells the operator how to take it over.
    """
    age = time.time() - record.updated_at
    lines = [
        f"{record.rollout_id}  {record.state:<11} {record.desired.name} {record.desired.version}  "
        f"wave {min(record.wave + 1, len(record.waves))}/{len(record.waves)}  "
        f"failures {record.failures}/{record.max_failures}  updated {age:.0f} s ago"
        + (f"  ({record.reason})" if record.reason else "")
    ]
    if driven is False:
        lines[0] += f"  [no live controller: imu-fleet resume {record.rollout_id}]"
    if detailed:
        lines.extend(
            f"  {node:<24} wave {o.wave + 1:<3} {o.state:<12} {o.error or ''}"
            for node, o in sorted(record.nodes.items(), key=lambda kv: (kv[1].wave, kv[0]))
        )
    return "\n".join(lines)


def cmd_nodes(args: argparse.Namespace) -> int:
    """`imu-fleet nodes`: one line per node."""
    with controller_session(args) as controller:
        time.sleep(args.wait)  # telemetry is periodic, not retained
        nodes = controller.view.nodes()
    print(format_nodes(nodes))
    return 0


def format_nodes(nodes: list[NodeView]) -> str:
    """The nodes table."""
    lines = [
        f"{'node':<24} {'online':<7} {'group':<12} {'model':<28} {'state':<11} "
        f"{'backend':<8} {'win/s':>7} {'p95 ms':>7}  {'follows':<24} drift"
    ]
    drifting = 0
    for view in nodes:
        model = view.model
        active = f"{model.active.name} {model.active.version}" if model and model.active else "-"
        telemetry = view.telemetry
        rate = f"{telemetry.windows_per_s:.1f}" if telemetry else "-"
        p95 = telemetry.latency_ms.p95 if telemetry and telemetry.latency_ms.p95 else None
        follows, drift = _follows(model)
        drifting += drift != "-"
        lines.append(
            f"{view.node_id:<24} {'yes' if view.online else 'no':<7} {view.group or '-':<12} "
            f"{active:<28} {model.state if model else '-':<11} "
            f"{(model.backend or '-') if model else '-':<8} {rate:>7} "
            f"{f'{p95:.1f}' if p95 is not None else '-':>7}  {follows:<24} {drift}"
        )
    lines.append(
        f"{len(nodes)} nodes, {sum(v.online for v in nodes)} online, {drifting} not running "
        "what they follow; follows = the desired state a node obeys (node-level = a pin)"
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
    follows = f"{where}: {following.version}{signed}{by}"
    running = model.active.version if model.active else None
    drift = "-" if running == following.version else f"wants {following.version}"
    if model.state == "failed" and model.last_error:
        drift += f" (refused: {model.last_error[:60]})"
    return follows, drift
