"""`imu-fleet` as an operator meets it: refusals that say what to do, expiry, examples in help."""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from common.bundle import read_bundle
from common.errors import BundleError
from common.signing import generate_keys, load_public_key, verify_manifest
from fleet import pki
from fleet.bundles.builder import parse_expiry
from fleet.bundles.reference import build_reference_bundle
from fleet.cli import build_parser, main
from helpers.mqtt import Probe
from helpers.waiting import unique
from node.tools.local_broker import LocalBroker
from schemas.codec import decode_any_window


@pytest.fixture(scope="module")
def onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    source = read_bundle(build_reference_bundle(folder / "ref.tar"))
    assert source.onnx is not None
    path = folder / "model.onnx"
    path.write_bytes(source.onnx)
    return path


def create(onnx: Path, out: Path, *extra: str) -> list[str]:
    return ["bundle", "create", "--onnx", str(onnx), "--name", "tcn", "--version", "1.0.0",
            "--out", str(out), *extra]  # fmt: skip


def test_bundle_create_refuses_to_guess_the_normalization(
    onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(create(onnx, tmp_path / "b.tar")) == 1
    err = capsys.readouterr().err
    assert "no --normalization" in err
    assert "--normalization-from-calibration" in err
    assert not (tmp_path / "b.tar").exists()
    assert main(create(onnx, tmp_path / "b.tar", "--normalization-from-calibration")) == 0


def test_expiry_from_create_and_sign_is_what_nodes_check(onnx: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    out = tmp_path / "e.tar"
    assert main(create(onnx, out, "--normalization-from-calibration", "--expires", "90d",
                       "--sign-key", str(keys / "fleet.key"))) == 0  # fmt: skip
    manifest = read_bundle(out).manifest
    assert manifest.expires_at is not None
    left = dt.datetime.fromisoformat(manifest.expires_at) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < left <= dt.timedelta(days=90)
    verify_manifest(manifest, load_public_key(keys / "fleet.pub"))  # it covers the expiry
    assert main(["bundle", "sign", str(out), "--key", str(keys / "fleet.key"), "--expires",
                 "2099-01-31"]) == 0  # fmt: skip
    resigned = read_bundle(out).manifest
    assert resigned.expires_at == "2099-01-31T00:00:00+00:00"
    verify_manifest(resigned, load_public_key(keys / "fleet.pub"))


@pytest.mark.parametrize("bad", ["yesterday", "-3d", "2001-01-01", "5x"])
def test_a_bad_or_past_expiry_is_refused(bad: str) -> None:
    with pytest.raises(BundleError, match="--expires"):
        parse_expiry(bad)


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[
    tuple[tuple[str, ...], argparse.ArgumentParser]
]:  # fmt: skip
    """Every leaf command of a parser, with its words."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += subcommands(child, (*path, name))
    return found or [(path, parser)]


LEAVES = subcommands(build_parser())


@pytest.mark.parametrize("words", [w for w, _ in LEAVES if w != ("pki",)], ids=" ".join)
def test_every_command_has_an_example_in_its_help_that_parses(words: tuple[str, ...]) -> None:
    parser = dict(LEAVES)[words]
    text = parser.format_help()
    assert "example" in text, f"imu-fleet {' '.join(words)} --help shows no example"
    joined = text.replace("\\\n", " ")
    examples = [line.strip() for line in joined.splitlines()
                if line.strip().startswith("imu-fleet " + " ".join(words))]  # fmt: skip
    assert examples, f"no `imu-fleet {' '.join(words)} ...` line in its help"
    for example in examples:
        argv = shlex.split(example.split("  #")[0].split(" | ")[0])[1:]
        build_parser().parse_args(argv)  # SystemExit (a wrong flag) fails the test


@pytest.mark.parametrize("words", [w for w, _ in subcommands(pki.build_parser())], ids=" ".join)
def test_every_pki_command_shows_how_it_is_called(words: tuple[str, ...]) -> None:
    parser = dict(subcommands(pki.build_parser()))[words]
    assert f"imu-fleet pki {words[0]} site/" in parser.format_help()


def test_simulated_sensors_send_headered_binary_frames(broker: LocalBroker) -> None:
    prefix = unique("bin")
    probe = Probe(broker.url).subscribe(f"imu/{prefix}-000/window")
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "simulate", "sensors", "--sensors", "1", "--mode",
         "window", "--encoding", "binary", "--prefix", prefix, "--duration", "2",
         "--broker", broker.url],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    frames = probe.wait_for(f"imu/{prefix}-000/window", 2)
    probe.close()
    for frame in frames:
        decoded = decode_any_window(frame.payload, None)
        assert frame.payload[:4] == b"\x89IMU"
        assert decoded.seq is not None
    assert len({decode_any_window(f.payload, None).seq for f in frames}) == len(frames)
