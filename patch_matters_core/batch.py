"""Captioning a folder of images into sidecar caption files (``photo.jpg`` -> ``photo.txt``).

The layout follows what LoRA trainers read: one UTF-8 caption per image, beside it, with the
same stem. Files are written atomically, an existing caption is kept unless overwriting is
asked for, and one bad image never stops the run or gets a caption file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import ConfigError, ImageLoadError, MissingDependencyError, ModelLoadError, PatchMattersError
from .fileio import write_text_atomic
from .images import SUPPORTED_EXTENSIONS, load_image
from .types import Trace

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    captioned: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.captioned)} captioned, {len(self.skipped)} skipped (caption file exists), "
            f"{len(self.failed)} failed"
        )


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """List image files in ``folder`` by extension, sorted, skipping hidden files."""
    if not folder.is_dir():
        raise PatchMattersError(f"Image folder not found: {folder}. Pass an existing folder.")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in candidates
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in SUPPORTED_EXTENSIONS
    )


def caption_path(image_path: Path, extension: str = ".txt") -> Path:
    return image_path.with_suffix(extension)


def caption_folder(
    images: Iterable[Path],
    caption: Callable[[object, str], Trace],
    overwrite: bool = False,
    extension: str = ".txt",
    trace_dir: Optional[Path] = None,
) -> BatchResult:
    """Caption each image with ``caption(pil_image, path) -> Trace`` and write its caption file.

    Images that already have a caption file are skipped unless ``overwrite``. An image that
    cannot be read or captioned is logged, listed in the result and gets no file; the run goes
    on with the next image. ``KeyboardInterrupt`` stops the run after the current image's
    files are complete, because every write is atomic.
    """
    result = BatchResult()
    images = list(images)
    start = time.perf_counter()
    logger.info("Batch: %d images.", len(images))

    for index, image_path in enumerate(images, start=1):
        target = caption_path(image_path, extension)
        if target.exists() and not overwrite:
            logger.info("[%d/%d] Skipping %s: %s exists.", index, len(images), image_path.name, target.name)
            result.skipped.append(image_path)
            continue

        try:
            image = load_image(image_path)
        except ImageLoadError as error:
            logger.warning("[%d/%d] Skipping %s: %s", index, len(images), image_path, error)
            result.failed.append((image_path, str(error)))
            continue

        try:
            trace = caption(image, str(image_path))
        except (ModelLoadError, MissingDependencyError, ConfigError):
            # These would fail every image the same way: stop instead of listing each one.
            raise
        except PatchMattersError as error:
            logger.warning("[%d/%d] Captioning %s failed: %s", index, len(images), image_path, error)
            result.failed.append((image_path, str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - one image's crash must not end the batch
            reason = f"unexpected {type(error).__name__}: {error}"
            logger.warning("[%d/%d] Captioning %s failed: %s", index, len(images), image_path, reason, exc_info=True)
            result.failed.append((image_path, reason))
            continue

        if not trace.caption.strip():
            reason = "the pipeline produced an empty caption"
            logger.warning("[%d/%d] %s: %s; no caption file written.", index, len(images), image_path, reason)
            result.failed.append((image_path, reason))
            continue

        write_text_atomic(target, trace.caption.strip() + "\n")
        if trace_dir is not None:
            trace_dir.mkdir(parents=True, exist_ok=True)
            trace.save(trace_dir / f"{image_path.stem}.json")
        result.captioned.append(image_path)
        logger.info("[%d/%d] Wrote %s.", index, len(images), target)

    logger.info("Batch done in %.1f s: %s.", time.perf_counter() - start, result.summary())
    return result
