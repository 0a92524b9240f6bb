"""Which model a node starts on: the configured bundle, or the last one it served.

A node records the bundle it swapped to last (`active-bundle.json` in its state folder, the file
in its cache). At start it opens the configured `model`; when that cannot be used (missing,
corrupt, or no longer signed by a trusted key: the fleet key was rotated and the old public key
removed), it starts on the recorded bundle instead, if that one verifies, and says so. So a key
rotation never leaves a node unable to start (docs/security.md).
"""

from __future__ import annotations

import logging
import threading

from common.bundle import Bundle, read_bundle
from common.errors import BundleError
from common.signing import SignatureError, load_trust
from node.config import NodeConfig, default_state_dir
from node.errors import ConfigError
from node.updates.first_boot import FirstBoot
from node.updates.last_served import remembered
from runtime.pipeline import ModelPipeline, open_pipeline

logger = logging.getLogger(__name__)


def open_model(config: NodeConfig, bundle: Bundle) -> ModelPipeline:
    """Load a bundle on the node's configured backend (with its fallback), golden-checked."""
    pipeline, _ = open_pipeline(
        bundle, config.backend, config.backend_options(), fallback=config.fallback
    )
    return pipeline


def open_configured_model(
    config: NodeConfig, node_id: str, stopping: threading.Event | None = None
) -> tuple[ModelPipeline, str] | None:
    """The model a node starts with, and why its backend was chosen.

    The configured `model` (its signature checked against `trust_key` before its files are
    read); when it cannot be used, the bundle the node served last; with neither configured
    nor served, the first one the fleet orders (node/updates/first_boot.py; None when
    `stopping` is set before it came). ConfigError, saying what to do, when nothing can."""
    trust = load_trust(config.trust_key) if config.trust_key is not None else None
    last = remembered(config.state_dir or default_state_dir(node_id))
    if config.model is None and last is None and config.follow_desired:
        logger.warning("no model configured or served before: waiting for one from the fleet")
        first = FirstBoot(config, node_id, stopping).wait()
        if first is None:
            return None
        last = first
    bundle: Bundle | None = None
    problem: BundleError | None = None
    if config.model is not None:
        try:
            bundle = read_bundle(config.model, trust=trust)
        except BundleError as exc:
            problem = exc
    if bundle is None and last is not None and last != config.model:
        try:
            bundle = read_bundle(last, trust=trust)
        except BundleError as exc:
            logger.error("the bundle this node served last (%s) is refused too: %s", last, exc)
        else:
            log = logger.error if problem is not None else logger.info
            log(
                "starting on the bundle this node served last, %s %s (%s)%s",
                bundle.ref.name,
                bundle.ref.version,
                last,
                f", instead of the configured model: {problem}. Update `model` (or sign it with "
                "a trusted key: `imu-fleet bundle sign BUNDLE --key fleet.key`)"
                if problem is not None
                else "",
            )
    if bundle is None:
        if problem is not None:  # the reader's own error, with what fixes it
            raise type(problem)(str(problem) + _sign_hint(problem)) from problem
        msg = "no model: pass --model BUNDLE (build one with `imu-fleet bundle create`)"
        raise ConfigError(msg)
    pipeline, choice = open_pipeline(
        bundle, config.backend, config.backend_options(), fallback=config.fallback
    )
    return pipeline, choice.reason


def _sign_hint(problem: BundleError) -> str:
    if isinstance(problem, SignatureError) and "bad signature" not in str(problem):
        return (
            "; sign it with the fleet key the node trusts (`imu-fleet bundle sign BUNDLE --key "
            "fleet.key`), or put the signer's public key in trust_key"
        )
    return ""
