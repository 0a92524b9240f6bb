"""Human-readable summary of a verified bundle."""

from __future__ import annotations

from common.bundle import Bundle
from schemas.manifest import LinearHead, PrototypeHead


def describe_bundle(bundle: Bundle) -> str:
    """A multi-line summary: identity, files, contract, normalisation, head, goldens."""
    m = bundle.manifest
    lines = [
        f"bundle      {bundle.path or '(memory)'}",
        f"model       {m.name} {m.version}   created {m.created_at} by {m.created_by or '?'}",
    ]
    if m.description:
        lines.append(f"about       {m.description}")
    lines.append("files       (sha256 and size verified)")
    lines.extend(
        f"  {name:<20} {entry.size:>10,} B  sha256 {entry.sha256[:16]}..."
        for name, entry in sorted(m.files.items())
    )
    batch = m.input.shape[0] if m.input.shape[0] is not None else "dynamic"
    lines.append(
        f"input       {m.input.name!r} [{batch}, 100, 9] {m.input.dtype} "
        f"{m.input.layout} ({','.join(m.input.channel_order)})"
    )
    out = m.outputs
    lines.append(f"outputs     latent {out.latent.name!r} [{out.latent.dim}]")
    if out.motif_logits:
        lines.append(f"            motif logits {out.motif_logits.name!r} [{out.motif_logits.dim}]")
    norm = m.normalization
    lines.append(f"normalise   {norm.method} from {norm.source or '?'}")
    lines.append(f"  mean      {', '.join(f'{v:.4g}' for v in norm.mean)}")
    lines.append(f"  std       {', '.join(f'{v:.4g}' for v in norm.std)}")
    head = m.motif_head
    if isinstance(head, PrototypeHead):
        labels = f"; labels {', '.join(head.labels)}" if head.labels else ""
        lines.append(f"motif head  12 prototypes, temperature {head.temperature:.4g}{labels}")
    elif isinstance(head, LinearHead):
        lines.append("motif head  linear 64 -> 12, softmax")
    else:
        lines.append("motif head  the model's own motif logits, softmax")
    if m.shown_labels:
        where = "" if m.motif_labels else " (from the motif head)"
        lines.append(f"motif names {', '.join(m.shown_labels)}{where}")
    lines.append(
        f"golden      {m.golden.count} windows (atol {m.golden.atol:g}, "
        f"min cosine {m.golden.min_cosine:g})"
    )
    lines.append(
        f"signature   {'ed25519 key ' + m.signature.key_id if m.signature else 'unsigned'}"
    )
    return "\n".join(lines)
