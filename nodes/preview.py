"""Preview image of a PatchSet: every patch box drawn and labelled on the image."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from patch_matters_core.types import (
    BOTTOM_LEFT,
    BOTTOM_RIGHT,
    GLOBAL,
    SEMANTIC,
    TOP_LEFT,
    TOP_RIGHT,
    PatchSet,
)

# Colours that stay apart from each other and readable on photographs (Okabe-Ito palette).
PATCH_COLOURS = {
    SEMANTIC: (230, 159, 0),
    TOP_LEFT: (86, 180, 233),
    TOP_RIGHT: (0, 158, 115),
    BOTTOM_LEFT: (240, 228, 66),
    BOTTOM_RIGHT: (204, 121, 167),
}
OTHER_COLOUR = (213, 94, 0)
OBJECT_COLOUR = (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has only the fixed-size bitmap font.
        return ImageFont.load_default()


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_patches(image: Image.Image, patches: PatchSet) -> Image.Image:
    """Return a copy of ``image`` with the merged object boxes and every patch box drawn.

    Patch boxes get a colour per patch and a filled label with the patch name. A patch that is
    not described (a semantic patch that covers nearly the whole image) gets "(skipped)" added.
    Merged object boxes are thin white lines. Line width and font size scale with the image.
    """
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    shorter_side = min(canvas.width, canvas.height)
    line_width = max(2, shorter_side // 160)
    font = _font(max(12, shorter_side // 28))

    for box in patches.merged_objects:
        draw.rectangle(box.to_list(), outline=OBJECT_COLOUR, width=max(1, line_width // 2))

    label_boxes: list[tuple[float, float, float, float]] = []
    for patch in patches.patches:
        if patch.name == GLOBAL:
            continue
        colour = PATCH_COLOURS.get(patch.name, OTHER_COLOUR)
        inset = line_width // 2
        x0, y0, x1, y1 = patch.box.to_list()
        draw.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], outline=colour, width=line_width)

        label = patch.name.replace("_", " ")
        if not patch.described:
            label += " (skipped)"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        padding = max(2, line_width)
        label_x = min(max(0.0, x0 + line_width), max(0.0, canvas.width - (right - left) - 2 * padding))
        label_y = max(0.0, y0 + line_width)
        # Labels of patches that start at the same corner would overlap: stack them downwards.
        for other in label_boxes:
            if abs(other[0] - label_x) < (right - left) and abs(other[1] - label_y) < (bottom - top) + 2 * padding:
                label_y = other[3] + 1
        label_box = (label_x, label_y, label_x + (right - left) + 2 * padding, label_y + (bottom - top) + 2 * padding)
        label_boxes.append(label_box)
        draw.rectangle(label_box, fill=colour)
        draw.text((label_x + padding - left, label_y + padding - top), label, fill=_text_colour(colour), font=font)

    return canvas
