"""Captioning a folder of images into sidecar caption files (``photo.jpg`` -> ``photo.txt``).

The layout follows what LoRA trainers read: one UTF-8 caption per image, beside it, with the
same stem. Files are written atomically, an existing caption is kept unless overwriting is
asked for, and one bad image never stops the run or gets a caption file.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

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
    interrupted: bool = False

    def summary(self) -> str:
        return (
            f"{len(self.captioned)} captioned, {len(self.skipped)} skipped (caption file exists), "
            f"{len(self.failed)} failed"
        )


def validate_caption_extension(extension: str) -> str:
    """Return the extension with a leading dot, or raise ConfigError for one that is unsafe."""
    extension = extension if extension.startswith(".") else f".{extension}"
    stem = extension[1:]
    if not stem or any(char in stem for char in "/\\.") or stem.strip() != stem:
        raise ConfigError(f"--caption-extension {extension!r} is invalid; use a plain extension such as .txt.")
    if extension.lower() in SUPPORTED_EXTENSIONS:
        raise ConfigError(
            f"--caption-extension {extension!r} is an image extension, so captions would replace images; "
            "use .txt or .caption."
        )
    return extension


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """List image files in ``folder`` by extension, sorted, skipping hidden files and folders."""
    if folder.is_file():
        raise ConfigError(f"{folder} is a file, not a folder; caption single files with `patch-matters caption`.")
    if not folder.is_dir():
        raise ConfigError(f"Image folder not found: {folder}. Pass an existing folder.")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = []
    for path in candidates:
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.suffix.lower() in SUPPORTED_EXTENSIONS and path.is_file():
            images.append(path)
    return sorted(images)


def caption_path(image_path: Path, extension: str = ".txt") -> Path:
    return image_path.with_suffix(extension)


def trace_names(images: Sequence[Path], root: Optional[Path] = None) -> dict[Path, str]:
    """Give each image a unique trace file name: its stem, its path below ``root`` when images
    of several folders are mixed, and a ``-2``, ``-3``... suffix where names still clash."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for image in images:
        if root is not None and image.parent != root:
            base = "__".join(image.relative_to(root).with_suffix("").parts)
        else:
            base = image.stem
        name = base
        suffix = 2
        while name.lower() in used:
            name = f"{base}-{suffix}"
            suffix += 1
        used.add(name.lower())
        names[image] = f"{name}.json"
    return names


def _caption_clashes(images: Sequence[Path], extension: str) -> dict[Path, str]:
    """Find images whose caption files would be the same file (``a.jpg`` and ``a.png``)."""
    by_target: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        # Case-insensitive file systems (Windows, macOS) treat IMG.txt and img.txt as one file.
        by_target[str(caption_path(image, extension)).lower()].append(image)
    reasons: dict[Path, str] = {}
    for group in by_target.values():
        if len(group) > 1:
            names = ", ".join(path.name for path in group)
            for image in group:
                reasons[image] = (
                    f"{names} would share the caption file {caption_path(image, extension).name}; "
                    "rename all but one of them"
                )
    return reasons


def caption_folder(
    images: Iterable[Path],
    caption: Callable[[object, str], Trace],
    overwrite: bool = False,
    extension: str = ".txt",
    trace_dir: Optional[Path] = None,
    root: Optional[Path] = None,
) -> BatchResult:
    """Caption each image with ``caption(pil_image, path) -> Trace`` and write its caption file.

    Images that already have a caption file are skipped unless ``overwrite``. An image that
    cannot be read, captioned or written is logged, listed in the result and gets no caption
    file; the run goes on with the next image. The trace is written before the caption file,
    because an existing caption file marks the image as done for a later run. A
    ``KeyboardInterrupt`` ends the run between files and sets ``result.interrupted``.
    """
    extension = validate_caption_extension(extension)
    result = BatchResult()
    images = list(images)
    clashes = _caption_clashes(images, extension)
    names = trace_names(images, root)
    start = time.perf_counter()
    logger.info("Batch: %d images.", len(images))

    try:
        for index, image_path in enumerate(images, start=1):
            where = f"[{index}/{len(images)}] {image_path}"
            target = caption_path(image_path, extension)

            if image_path in clashes:
                logger.warning("%s: not captioned: %s.", where, clashes[image_path])
                result.failed.append((image_path, clashes[image_path]))
                continue
            if target.is_dir():
                reason = f"the caption path {target} is a folder; move it away"
                logger.warning("%s: not captioned: %s.", where, reason)
                result.failed.append((image_path, reason))
                continue
            if target.exists() and not overwrite:
                logger.info("%s: skipped, %s exists.", where, target.name)
                result.skipped.append(image_path)
                continue

            try:
                image = load_image(image_path)
            except ImageLoadError as error:
                logger.warning("%s: cannot be read: %s", where, error)
                result.failed.append((image_path, str(error)))
                continue

            try:
                trace = caption(image, str(image_path))
            except (ModelLoadError, MissingDependencyError, ConfigError):
                # These would fail every image the same way: stop instead of listing each one.
                raise
            except PatchMattersError as error:
                logger.warning("%s: captioning failed: %s", where, error)
                result.failed.append((image_path, str(error)))
                continue
            except Exception as error:  # noqa: BLE001 - one image's crash must not end the batch
                reason = f"unexpected {type(error).__name__}: {error}"
                logger.warning("%s: captioning failed: %s", where, reason, exc_info=True)
                result.failed.append((image_path, reason))
                continue

            if not trace.caption.strip():
                reason = "the pipeline produced an empty caption"
                logger.warning("%s: %s; no caption file written.", where, reason)
                result.failed.append((image_path, reason))
                continue

            try:
                if trace_dir is not None:
                    trace.save(trace_dir / names[image_path])
                write_text_atomic(target, trace.caption.strip() + "\n")
            except (OSError, UnicodeError) as error:
                reason = f"writing {target.name} failed: {error}"
                logger.warning("%s: %s", where, reason)
                result.failed.append((image_path, reason))
                continue

            result.captioned.append(image_path)
            logger.info("%s: wrote %s.", where, target.name)
    except KeyboardInterrupt:
        result.interrupted = True
        logger.warning("Batch interrupted; files written so far are complete.")

    logger.info("Batch done in %.1f s: %s.", time.perf_counter() - start, result.summary())
    return result
