"""Every command in docs/operations.md is one the shipped tools and files accept.

The runbook is what an operator types during an incident: a flag that was renamed, a compose
service or profile that does not exist, a topic the role may not read, would fail them then.
Each command line in its shell blocks (and each `imu-...` command quoted inline) is checked here
against the real argument parsers, compose files, unit, settings and broker ACL grants; a command
this test does not know how to check fails it, so new commands come with a check.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

from fleet import pki
from fleet.cli import build_parser as fleet_parser
from fleet.pki.roles import ROLES
from fleet.settings import FleetBrokerSettings
from node.cli import build_parser as node_parser
from node.config import NodeConfig

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "operations.md"
PLACEHOLDERS = {"ID": "r-20261130-1", "ROLLOUT-ID": "r-20261130-1", "BUNDLE": "b.tar"}
"""Words the runbook uses for what the operator fills in, as values the parsers take."""


def blocks(language: str) -> Iterator[str]:
    """The fenced code blocks of the runbook in `language`."""
    for block in re.findall(rf"```{language}\n(.*?)```", RUNBOOK.read_text(), flags=re.S):
        yield textwrap.dedent(block)


JOURNEY = re.compile(r"<!-- runbook-journey -->.*?<!-- /runbook-journey -->", flags=re.S)
"""The section tests/test_runbook_journey.py runs: its commands are executed, not only parsed."""


def shell_commands() -> list[str]:
    """Each command line of the shell blocks (continuations joined), and inline commands; in the
    section the journey test runs, the `imu-*` ones (it executes all of them)."""
    commands: list[str] = []
    journey = " ".join(JOURNEY.findall(RUNBOOK.read_text()))
    for block in blocks("sh"):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.strip().removesuffix(" &")
            if not line or line.startswith("#"):
                continue
            if line in journey and not line.startswith(("imu-node", "imu-fleet")):
                continue
            commands.append(line)
    commands += re.findall(r"`((?:imu-node|imu-fleet) [^`]+)`", RUNBOOK.read_text())
    return commands


def argv_of(command: str) -> list[str]:
    return [PLACEHOLDERS.get(word, word) for word in shlex.split(command)]


def parses(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"the parser refuses {argv}")


def check_compose(argv: list[str]) -> None:
    """`docker compose -f FILE [--profile P] up -d | ps | ...`: the file, profile and services;
    `podman-compose -f FILE ...` likewise, run from compose/ (docs/operations.md says why)."""
    assert argv[:2] == ["docker", "compose"] or argv[0] == "podman-compose", argv
    folder = ROOT / "compose" if argv[0] == "podman-compose" else ROOT
    file = folder / argv[argv.index("-f") + 1]
    assert file.is_file(), f"{file} does not exist"
    services = yaml.safe_load(file.read_text())["services"]
    words = argv[argv.index("-f") + 2 :]
    if "--profile" in words:
        at = words.index("--profile")
        profile = words[at + 1]
        del words[at : at + 2]
        assert any(profile in s.get("profiles", []) for s in services.values()), profile
    rest = [word for word in words if not word.startswith("-")]
    action, *named = rest
    assert action in {"up", "ps", "logs", "pull", "restart", "down"}, action
    for service in named:
        assert service in services, f"{file.name} has no service {service}"


def check_readable(argv: list[str]) -> None:
    """`mosquitto_sub ... -u USER -t FILTER`: the user's role may read every filter."""
    user = argv[argv.index("-u") + 1]
    role, name = user.split("-", 1)
    assert role in ROLES, user
    client = pki.Client(role, name, cert=True, password=False)
    readable = {grant.topic for grant in client.grants() if grant.access == "read"}
    filters = [argv[i + 1] for i, word in enumerate(argv) if word == "-t"]
    assert filters
    for topic_filter in filters:
        assert any(topic_matches_sub(grant, topic_filter) for grant in readable), (
            f"role {role.name} may not read {topic_filter}"
        )


def check(command: str) -> None:
    argv = argv_of(command)
    if argv[0] == "sudo":
        argv = argv[1:]
    match argv[0]:
        case "imu-node":
            parses(node_parser(), argv[1:])
        case "imu-fleet" if argv[1] == "pki":
            parses(pki.build_parser(), argv[2:])
        case "imu-fleet":
            parses(fleet_parser(), argv[1:])
        case "docker" | "podman-compose":
            check_compose(argv)
        case script if script.startswith("scripts/"):
            path = ROOT / script
            assert path.is_file(), f"no {script}"
            assert path.stat().st_mode & 0o111, f"{script} is not executable"
        case "systemctl" | "journalctl":
            unit = argv[-1] if argv[0] == "systemctl" else argv[argv.index("-u") + 1]
            assert (ROOT / "compose" / f"{unit}.service").is_file(), f"no unit {unit}"
        case "mosquitto_sub":
            check_readable(argv)
        case "python3":  # a one-liner the operator runs: run it
            done = subprocess.run(
                [sys.executable, *argv[1:]], check=True, capture_output=True, timeout=30
            )
            assert done.stdout.strip()
        case _:
            pytest.fail(f"docs/operations.md runs {argv[0]!r}: teach this test to check it")


COMMANDS = shell_commands()


def test_the_runbook_has_commands() -> None:
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", COMMANDS)
def test_every_runbook_command_is_accepted(command: str) -> None:
    check(command)


def test_the_settings_in_the_runbook_exist() -> None:
    """A node TOML (`/etc/imu-node*.toml`) has node settings; the fleet tools' files broker
    settings."""
    for block in blocks("toml"):
        fields = (
            NodeConfig.model_fields
            if block.startswith("# /etc/imu-node") or not block.startswith("#")
            else FleetBrokerSettings.model_fields
        )
        for key in tomllib.loads(block):
            assert key in fields, f"no such setting {key} in\n{block}"


def test_the_runbook_links_to_sections_that_exist() -> None:
    """The alert annotations and the table link to `#anchor`s of these sections."""
    text = RUNBOOK.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)
    }
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, anchor
    for anchor in ("device-not-found", "broker-unreachable", "model-refused", "slow-node",
                   "disk-full"):  # fmt: skip
        assert anchor in anchors
    rules = yaml.safe_load((ROOT / "compose" / "prometheus" / "alerts.yml").read_text())
    for rule in (rule for group in rules["groups"] for rule in group["rules"]):
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']} links to a missing section #{anchor}"
        assert f"`{rule['alert']}`" in text, f"the runbook does not say what {rule['alert']} means"
