"""Folder captioning: skips, failures and caption files, with a scripted captioning function."""

from __future__ import annotations

import pytest
from PIL import Image

from patch_matters_core.batch import caption_folder, find_images, validate_caption_extension
from patch_matters_core.errors import ConfigError, ModelLoadError, PatchMattersError
from patch_matters_core.types import ImageInfo, Trace


def make_trace(caption: str) -> Trace:
    return Trace(
        image=ImageInfo(path=None, sha256="0", width=1, height=1),
        patches=[],
        descriptions={},
        statements=[],
        levels=[],
        fallbacks=[],
        models={},
        timings={},
        caption=caption,
    )


@pytest.fixture
def folder(tmp_path):
    for name in ("a.jpg", "b.PNG", "c.webp"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "broken.jpg").write_bytes(b"this is text")
    return tmp_path


def test_find_images_filters_by_extension(folder):
    names = [path.name for path in find_images(folder)]
    assert names == ["a.jpg", "b.PNG", "broken.jpg", "c.webp"]


def test_find_images_missing_folder(tmp_path):
    with pytest.raises(PatchMattersError, match="not found"):
        find_images(tmp_path / "missing")


def test_caption_folder_writes_and_skips(folder):
    (folder / "a.txt").write_text("kept caption\n", encoding="utf-8")
    result = caption_folder(find_images(folder), lambda image, path: make_trace(f"caption of {path}"))

    assert [path.name for path in result.skipped] == ["a.jpg"]
    assert [path.name for path in result.captioned] == ["b.PNG", "c.webp"]
    assert [path.name for path, _ in result.failed] == ["broken.jpg"]
    assert (folder / "a.txt").read_text(encoding="utf-8") == "kept caption\n"
    assert (folder / "b.txt").read_text(encoding="utf-8").startswith("caption of ")
    assert not (folder / "broken.txt").exists()
    assert not list(folder.glob(".*.tmp"))


def test_caption_folder_overwrite(folder):
    (folder / "a.txt").write_text("old\n", encoding="utf-8")
    caption_folder(find_images(folder), lambda image, path: make_trace("new"), overwrite=True)
    assert (folder / "a.txt").read_text(encoding="utf-8") == "new\n"


def test_caption_folder_failure_writes_nothing(folder):
    def caption(image, path):
        if path.endswith("b.PNG"):
            raise RuntimeError("CUDA error: device-side assert")
        if path.endswith("c.webp"):
            return make_trace("   ")
        return make_trace("fine")

    result = caption_folder(find_images(folder), caption)
    reasons = dict((path.name, reason) for path, reason in result.failed)
    assert "RuntimeError" in reasons["b.PNG"]
    assert "empty caption" in reasons["c.webp"]
    assert not (folder / "b.txt").exists()
    assert not (folder / "c.txt").exists()
    assert (folder / "a.txt").read_text(encoding="utf-8") == "fine\n"


def test_caption_folder_stops_on_model_error(folder):
    def caption(image, path):
        raise ModelLoadError("vlm model 'x' is not on this machine")

    with pytest.raises(ModelLoadError):
        caption_folder(find_images(folder), caption)


def test_caption_folder_writes_traces(folder, tmp_path_factory):
    traces = tmp_path_factory.mktemp("traces")
    caption_folder(find_images(folder), lambda image, path: make_trace("x"), trace_dir=traces)
    assert sorted(path.name for path in traces.iterdir()) == ["a.json", "b.json", "c.json"]


@pytest.mark.parametrize("extension", [".jpg", "PNG", "", ".", "a/b", ".tar.gz"])
def test_caption_extension_rejected(extension):
    with pytest.raises(ConfigError):
        validate_caption_extension(extension)


def test_caption_extension_without_dot():
    assert validate_caption_extension("caption") == ".caption"


def test_same_stem_images_both_fail(tmp_path):
    for name in ("photo.jpg", "photo.png", "other.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    result = caption_folder(find_images(tmp_path), lambda image, path: make_trace(path), overwrite=True)

    failed = {path.name: reason for path, reason in result.failed}
    assert set(failed) == {"photo.jpg", "photo.png"}
    assert "photo.txt" in failed["photo.jpg"]
    assert not (tmp_path / "photo.txt").exists()
    assert (tmp_path / "other.txt").exists()


def test_caption_path_folder_fails(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").mkdir()
    result = caption_folder(find_images(tmp_path), lambda image, path: make_trace("x"), overwrite=True)
    assert [path.name for path, _ in result.failed] == ["a.jpg"]
    assert result.skipped == []


def test_recursive_skips_hidden_folders_and_names_traces(tmp_path, tmp_path_factory):
    for folder in ("s1", "s2", ".cache"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "img.jpg")
    images = find_images(tmp_path, recursive=True)
    assert [path.parent.name for path in images] == ["s1", "s2"]

    traces = tmp_path_factory.mktemp("traces")
    caption_folder(images, lambda image, path: make_trace("x"), trace_dir=traces, root=tmp_path)
    assert sorted(path.name for path in traces.iterdir()) == ["s1__img.json", "s2__img.json"]


def test_interrupt_keeps_finished_files(folder):
    def caption(image, path):
        if path.endswith("b.PNG"):
            raise KeyboardInterrupt
        return make_trace("done")

    result = caption_folder(find_images(folder), caption)
    assert result.interrupted
    assert (folder / "a.txt").exists()
    assert not (folder / "b.txt").exists()
    assert not list(folder.glob(".*.tmp"))


def test_caption_file_mode_follows_umask(folder):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        (folder / "a.txt").write_text("old\n", encoding="utf-8")
        os.chmod(folder / "a.txt", 0o664)
        caption_folder(find_images(folder), lambda image, path: make_trace("new"), overwrite=True)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((folder / "a.txt").stat().st_mode) == 0o664
    assert stat.S_IMODE((folder / "b.txt").stat().st_mode) == 0o644
