"""The model bundle manifest (public contract).

A bundle is one archive holding `manifest.json` and the files it lists (`model.onnx` and/or
`model.hef`, the golden vectors). The manifest carries everything a node needs to run the model
and to prove it before it takes traffic: the input contract, per-channel normalisation, the
outputs, the motif head when the model gives only a latent, and the golden vectors' files.

`signature` is reserved for the fleet's Ed25519 signature over the canonical manifest (the
manifest serialised with `signature` set to null, keys sorted); `expires_at` bounds how long a
pushed manifest is valid. Both are enforced when signed rollouts land.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.limits import CHANNEL_ORDER, CHANNELS, LATENT_DIM, MOTIF_COUNT, WINDOW_LENGTH

MANIFEST_VERSION: Final = 1
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

Finite = Annotated[float, AllowInfNan(False)]

MOTIF_LABEL_MAX_CHARS: Final = 32
MotifLabel = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        min_length=1,
        max_length=MOTIF_LABEL_MAX_CHARS,
        pattern=r"^[^\x00-\x1f\x7f]+$",
    ),
]
"""One motif's human name: 1-32 characters, no control characters."""
MotifLabels = Annotated[list[MotifLabel], Field(min_length=MOTIF_COUNT, max_length=MOTIF_COUNT)]
"""A name for each of the 12 motifs, in motif index order."""
_MOTIF_LABELS: Final = TypeAdapter(MotifLabels)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Frozen):
    """One file inside the bundle."""

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0)]


class InputSpec(_Frozen):
    """The model's input contract."""

    name: str = Field(description="Input tensor name, as the model file spells it")
    shape: list[int | None] = Field(description="[batch, 100, 9]; batch null when dynamic")
    layout: Literal["NTC"] = "NTC"
    dtype: Literal["float32"] = "float32"
    window_length: Literal[100] = WINDOW_LENGTH
    channels: Literal[9] = CHANNELS
    channel_order: tuple[str, ...] = CHANNEL_ORDER

    @field_validator("shape")
    @classmethod
    def _ntc(cls, shape: list[int | None]) -> list[int | None]:
        if len(shape) != 3 or shape[1:] != [WINDOW_LENGTH, CHANNELS]:
            msg = f"input shape must be [batch, {WINDOW_LENGTH}, {CHANNELS}], got {shape}"
            raise ValueError(msg)
        return shape

    @field_validator("channel_order")
    @classmethod
    def _order(cls, order: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(order) != CHANNEL_ORDER:
            msg = f"channel_order must be {list(CHANNEL_ORDER)}; reorder the model's inputs"
            raise ValueError(msg)
        return order


class Normalization(_Frozen):
    """Per-channel z-score applied on the node before the model: (x - mean) / std."""

    method: Literal["z_score_per_channel"] = "z_score_per_channel"
    mean: Annotated[list[Finite], Field(min_length=CHANNELS, max_length=CHANNELS)]
    std: Annotated[list[Finite], Field(min_length=CHANNELS, max_length=CHANNELS)]
    source: str = Field(default="", description="Where the statistics came from")

    @field_validator("std")
    @classmethod
    def _positive(cls, std: list[float]) -> list[float]:
        if any(s <= 0 for s in std):
            msg = f"every std must be > 0, got {std}"
            raise ValueError(msg)
        return std


class OutputSpec(_Frozen):
    """One model output: its tensor name and size per window."""

    name: str
    dim: int


class Outputs(_Frozen):
    """The model's outputs: the latent, and motif logits when the model has them."""

    latent: OutputSpec
    motif_logits: OutputSpec | None = None

    @model_validator(mode="after")
    def _dims(self) -> Outputs:
        if self.latent.dim != LATENT_DIM:
            msg = f"latent output must have {LATENT_DIM} values, not {self.latent.dim}"
            raise ValueError(msg)
        if self.motif_logits is not None and self.motif_logits.dim != MOTIF_COUNT:
            msg = f"motif_logits output must have {MOTIF_COUNT} values"
            raise ValueError(msg)
        return self


class HeadKind(StrEnum):
    """How motif scores are derived from the latent on the node."""

    PROTOTYPES = "prototypes"
    LINEAR = "linear"


class PrototypeHead(_Frozen):
    """softmax(-||z - p_k||^2 / temperature) over 12 prototypes p_k (k-means centroids)."""

    kind: Literal[HeadKind.PROTOTYPES] = HeadKind.PROTOTYPES
    prototypes: Annotated[
        list[Annotated[list[Finite], Field(min_length=LATENT_DIM, max_length=LATENT_DIM)]],
        Field(min_length=MOTIF_COUNT, max_length=MOTIF_COUNT),
    ]
    temperature: Annotated[float, Field(gt=0)]
    labels: list[str] | None = Field(
        default=None, description="Optional human name per motif (e.g. dominant activity)"
    )


class LinearHead(_Frozen):
    """softmax(W z + b) with W of shape (12, 64)."""

    kind: Literal[HeadKind.LINEAR] = HeadKind.LINEAR
    weight: Annotated[
        list[Annotated[list[Finite], Field(min_length=LATENT_DIM, max_length=LATENT_DIM)]],
        Field(min_length=MOTIF_COUNT, max_length=MOTIF_COUNT),
    ]
    bias: Annotated[list[Finite], Field(min_length=MOTIF_COUNT, max_length=MOTIF_COUNT)]
    labels: list[str] | None = None


MotifHead = Annotated[PrototypeHead | LinearHead, Field(discriminator="kind")]


class Golden(_Frozen):
    """Golden vectors: raw input windows and the latents the model must produce for them."""

    inputs: str = Field(default="golden_inputs.npy", description="(k, 100, 9) raw windows")
    latents: str = Field(default="golden_latents.npy", description="(k, 64) expected latents")
    count: Annotated[int, Field(ge=1)]
    atol: Annotated[float, Field(gt=0)] = Field(
        default=1e-4, description="Max abs error allowed against the expected latent"
    )
    min_cosine: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.999, description="Min cosine similarity allowed (float backends)"
    )
    min_cosine_quantized: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.95, description="Min cosine similarity allowed on quantised backends (HEF)"
    )


class HefInfo(_Frozen):
    """What the bundle's `model.hef` was compiled for and how close it came to its ONNX twin."""

    hw_arch: Literal["hailo8", "hailo8l"] = Field(
        description="Target chip: a Hailo-8 runs hailo8 and hailo8l HEFs, a Hailo-8L only hailo8l"
    )
    compiler: str = Field(default="", description="e.g. `hailo_sdk_client 3.33.0`")
    quantized: bool = True
    cosine_mean: float | None = Field(
        default=None, description="Mean cosine vs ONNX on the calibration set (emulator)"
    )
    max_abs_error: float | None = None


class Signature(_Frozen):
    """Ed25519 signature over the canonical manifest (reserved; enforced with signed rollouts)."""

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str = Field(description="Base64 signature")


class Manifest(_Frozen):
    """`manifest.json` of a model bundle."""

    manifest_version: Literal[1] = MANIFEST_VERSION
    name: str
    version: str
    created_at: str = Field(description="ISO 8601 UTC creation time")
    created_by: str = ""
    description: str = ""
    files: dict[str, FileEntry]
    input: InputSpec
    normalization: Normalization
    outputs: Outputs
    motif_head: MotifHead | None = None
    golden: Golden
    hef: HefInfo | None = Field(default=None, description="Present when the bundle has model.hef")
    motif_labels: MotifLabels | None = Field(
        default=None,
        # absent, not null, when unset: older manifests keep their bytes and signatures
        exclude_if=lambda labels: labels is None,
        description=f"A short name (1-{MOTIF_LABEL_MAX_CHARS} characters) for each of the "
        f"{MOTIF_COUNT} motifs, in index order; dashboards show `motif N` without it",
    )
    expires_at: str | None = None
    signature: Signature | None = None

    @property
    def shown_labels(self) -> list[str] | None:
        """The motif names dashboards show: `motif_labels`, else the motif head's own `labels`
        when they are a valid name for each of the 12 motifs (older bundles kept them there)."""
        if self.motif_labels is not None:
            return list(self.motif_labels)
        head_labels = self.motif_head.labels if self.motif_head is not None else None
        if head_labels is None:
            return None
        try:
            return list(_MOTIF_LABELS.validate_python(head_labels))
        except ValidationError:
            return None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME.match(name):
            msg = f"model name {name!r} must be lowercase letters, digits, '.', '_' or '-'"
            raise ValueError(msg)
        return name

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        if not SEMVER.match(version):
            msg = f"version {version!r} is not semantic (MAJOR.MINOR.PATCH, e.g. 1.4.0)"
            raise ValueError(msg)
        return version

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if not ({"model.onnx", "model.hef"} & self.files.keys()):
            msg = "a bundle needs model.onnx and/or model.hef"
            raise ValueError(msg)
        if ("model.hef" in self.files) != (self.hef is not None):
            msg = "model.hef and the manifest's hef section come together"
            raise ValueError(msg)
        for name in (self.golden.inputs, self.golden.latents):
            if name not in self.files:
                msg = f"golden file {name!r} is not listed in files"
                raise ValueError(msg)
        if self.outputs.motif_logits is None and self.motif_head is None:
            msg = "the model has no motif_logits output, so the manifest needs a motif_head"
            raise ValueError(msg)
        return self
