"""Plain dataclasses that every stage takes and returns, and the JSON trace of a run.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the original image, with ``x1 > x0`` and
``y1 > y0``. Every class converts to JSON-ready dictionaries with ``to_dict`` and back
with ``from_dict``, so a run can be saved, inspected and replayed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

GLOBAL = "global"
SEMANTIC = "semantic"
TOP_LEFT = "top_left"
TOP_RIGHT = "top_right"
BOTTOM_LEFT = "bottom_left"
BOTTOM_RIGHT = "bottom_right"
SPATIAL_PATCH_NAMES = (TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT)

# Neighbouring spatial patches, in the order the level-2 merge visits them.
ADJACENT_PAIRS = (
    (TOP_LEFT, TOP_RIGHT),
    (TOP_RIGHT, BOTTOM_RIGHT),
    (BOTTOM_RIGHT, BOTTOM_LEFT),
    (BOTTOM_LEFT, TOP_LEFT),
)

StatementKind = Literal["consistent", "contradictory", "unique"]
# "single_sample": one description only, so its sentences are unique statements without an LLM call.
SortingPath = Literal["llm", "llm_retry", "sentence_fallback", "single_sample"]


def pair_name(first: str, second: str) -> str:
    """Name of the merged region of two neighbouring patches, ``pair:<a>+<b>``."""
    return f"pair:{first}+{second}"


@dataclass(frozen=True)
class Box:
    """Axis-aligned box ``[x0, y0, x1, y1]`` in pixels of the original image."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def from_list(cls, values: list[float] | tuple[float, ...]) -> "Box":
        if len(values) != 4:
            raise ValueError(f"A box needs 4 numbers [x0, y0, x1, y1], got {list(values)!r}.")
        return cls(*(float(v) for v in values))

    def to_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]

    @property
    def width(self) -> float:
        return max(0.0, self.x1 - self.x0)

    @property
    def height(self) -> float:
        return max(0.0, self.y1 - self.y0)

    @property
    def area(self) -> float:
        return self.width * self.height


@dataclass
class Detection:
    """One object found by the detector, already in original-image pixels."""

    label: str
    score: float
    box: Box

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "box": self.box.to_list()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Detection":
        return cls(label=data["label"], score=float(data["score"]), box=Box.from_list(data["box"]))


@dataclass
class Patch:
    """A region that is described: the whole image, the semantic patch or a spatial patch."""

    name: str
    box: Box
    described: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "box": self.box.to_list(), "described": self.described}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Patch":
        return cls(name=data["name"], box=Box.from_list(data["box"]), described=bool(data["described"]))


@dataclass
class Fallback:
    """A place where the pipeline replaced a missing or unusable result by a stated substitute."""

    stage: str
    patch: Optional[str]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fallback":
        return cls(stage=data["stage"], patch=data.get("patch"), reason=data["reason"])


@dataclass
class PatchSet:
    """Output of the divide stage: the patches of one image and how they were found."""

    width: int
    height: int
    patches: list[Patch]
    global_caption: str = ""
    detections: list[Detection] = field(default_factory=list)
    merged_objects: list[Box] = field(default_factory=list)
    matched_labels: list[str] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)

    def get(self, name: str) -> Patch:
        for patch in self.patches:
            if patch.name == name:
                return patch
        raise KeyError(f"No patch named {name!r}; patches are {[p.name for p in self.patches]}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "patches": [p.to_dict() for p in self.patches],
            "global_caption": self.global_caption,
            "detections": [d.to_dict() for d in self.detections],
            "merged_objects": [b.to_list() for b in self.merged_objects],
            "matched_labels": list(self.matched_labels),
            "fallbacks": [f.to_dict() for f in self.fallbacks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatchSet":
        return cls(
            width=int(data["width"]),
            height=int(data["height"]),
            patches=[Patch.from_dict(p) for p in data["patches"]],
            global_caption=data.get("global_caption", ""),
            detections=[Detection.from_dict(d) for d in data.get("detections", [])],
            merged_objects=[Box.from_list(b) for b in data.get("merged_objects", [])],
            matched_labels=list(data.get("matched_labels", [])),
            fallbacks=[Fallback.from_dict(f) for f in data.get("fallbacks", [])],
        )


@dataclass
class Descriptions:
    """Output of the describe stage: sample texts per patch name.

    ``samples["global"]`` has one text; each described patch has ``num_samples`` texts,
    indexed by (patch, sample) so that no patch can receive another patch's samples.
    An empty string stands for a sample whose output was unusable (see ``fallbacks``).
    """

    patches: PatchSet
    samples: dict[str, list[str]]
    fallbacks: list[Fallback] = field(default_factory=list)

    @property
    def global_description(self) -> str:
        return self.samples.get("global", [""])[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "patches": self.patches.to_dict(),
            "samples": {name: list(texts) for name, texts in self.samples.items()},
            "fallbacks": [f.to_dict() for f in self.fallbacks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Descriptions":
        return cls(
            patches=PatchSet.from_dict(data["patches"]),
            samples={name: list(texts) for name, texts in data["samples"].items()},
            fallbacks=[Fallback.from_dict(f) for f in data.get("fallbacks", [])],
        )


@dataclass
class Statement:
    """One statement of a filtered set, with its kind, its ITM score and whether it was kept.

    ``patch`` is the set the statement belongs to (a patch name or a ``pair:`` name);
    ``source_patch`` and ``sample_index`` name the description it came from when it came from
    one, and ``sample_indexes`` lists every sample that states it.
    ``group`` numbers the contradictory group it belongs to, ``None`` for other kinds.
    ``score`` is ``None`` when the statement was not scored.
    """

    patch: str
    text: str
    kind: StatementKind
    score: Optional[float] = None
    kept: bool = False
    source_patch: Optional[str] = None
    sample_index: Optional[int] = None
    group: Optional[int] = None
    sample_indexes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Statement":
        return cls(
            patch=data["patch"],
            text=data["text"],
            kind=data["kind"],
            score=data.get("score"),
            kept=bool(data.get("kept", False)),
            source_patch=data.get("source_patch"),
            sample_index=data.get("sample_index"),
            group=data.get("group"),
            sample_indexes=list(data.get("sample_indexes", [])),
        )


@dataclass
class FilteredSet:
    """Reliable statements of one set of descriptions (the samples of a patch, or a pair)."""

    name: str
    statements: list[Statement]
    sorting_path: SortingPath

    @property
    def reliable(self) -> list[str]:
        return [s.text for s in self.statements if s.kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sorting_path": self.sorting_path,
            "statements": [s.to_dict() for s in self.statements],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FilteredSet":
        return cls(
            name=data["name"],
            sorting_path=data["sorting_path"],
            statements=[Statement.from_dict(s) for s in data["statements"]],
        )


@dataclass
class FilteredDescriptions:
    """Output of the filter stage: the descriptions plus one filtered set per described patch."""

    descriptions: Descriptions
    sets: dict[str, FilteredSet]
    fallbacks: list[Fallback] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "descriptions": self.descriptions.to_dict(),
            "sets": {name: s.to_dict() for name, s in self.sets.items()},
            "fallbacks": [f.to_dict() for f in self.fallbacks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FilteredDescriptions":
        return cls(
            descriptions=Descriptions.from_dict(data["descriptions"]),
            sets={name: FilteredSet.from_dict(s) for name, s in data["sets"].items()},
            fallbacks=[Fallback.from_dict(f) for f in data.get("fallbacks", [])],
        )


@dataclass
class LevelText:
    """Text written at one aggregation step, with the patches whose content it covers."""

    level: int
    name: str
    covers: list[str]
    text: str
    box: Optional[Box] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "name": self.name,
            "covers": list(self.covers),
            "text": self.text,
            "box": self.box.to_list() if self.box else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LevelText":
        box = data.get("box")
        return cls(
            level=int(data["level"]),
            name=data["name"],
            covers=list(data["covers"]),
            text=data["text"],
            box=Box.from_list(box) if box else None,
        )


@dataclass
class Aggregation:
    """Output of the aggregate stage."""

    caption: str
    levels: list[LevelText]
    statements: list[Statement] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "levels": [lv.to_dict() for lv in self.levels],
            "statements": [s.to_dict() for s in self.statements],
            "fallbacks": [f.to_dict() for f in self.fallbacks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Aggregation":
        return cls(
            caption=data["caption"],
            levels=[LevelText.from_dict(lv) for lv in data["levels"]],
            statements=[Statement.from_dict(s) for s in data.get("statements", [])],
            fallbacks=[Fallback.from_dict(f) for f in data.get("fallbacks", [])],
        )


@dataclass
class ModelInfo:
    """Model that ran in one role (vlm, llm, detector, scorer)."""

    role: str
    source: Optional[str]
    family: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImageInfo:
    path: Optional[str]
    sha256: str
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trace:
    """Everything one run produced; ``to_json`` gives the trace file a user inspects."""

    image: ImageInfo
    patches: list[Patch]
    descriptions: dict[str, list[str]]
    statements: list[Statement]
    levels: list[LevelText]
    fallbacks: list[Fallback]
    models: dict[str, ModelInfo]
    timings: dict[str, float]
    caption: str
    global_caption: str = ""
    detections: list[Detection] = field(default_factory=list)
    sorting: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image.to_dict(),
            "patches": [p.to_dict() for p in self.patches],
            "descriptions": {k: list(v) for k, v in self.descriptions.items()},
            "statements": [s.to_dict() for s in self.statements],
            "levels": [lv.to_dict() for lv in self.levels],
            "fallbacks": [f.to_dict() for f in self.fallbacks],
            "models": {role: info.to_dict() for role, info in self.models.items()},
            "timings": dict(self.timings),
            "caption": self.caption,
            "global_caption": self.global_caption,
            "detections": [d.to_dict() for d in self.detections],
            "sorting": dict(self.sorting),
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Trace":
        return cls(
            image=ImageInfo(**data["image"]),
            patches=[Patch.from_dict(p) for p in data["patches"]],
            descriptions={k: list(v) for k, v in data["descriptions"].items()},
            statements=[Statement.from_dict(s) for s in data["statements"]],
            levels=[LevelText.from_dict(lv) for lv in data["levels"]],
            fallbacks=[Fallback.from_dict(f) for f in data["fallbacks"]],
            models={role: ModelInfo(**info) for role, info in data["models"].items()},
            timings={k: float(v) for k, v in data["timings"].items()},
            caption=data["caption"],
            global_caption=data.get("global_caption", ""),
            detections=[Detection.from_dict(d) for d in data.get("detections", [])],
            sorting=dict(data.get("sorting", {})),
            config=dict(data.get("config", {})),
        )

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Trace":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the trace as UTF-8 JSON, atomically."""
        from .fileio import write_text_atomic

        write_text_atomic(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
