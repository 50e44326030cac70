"""ComfyUI nodes of Patch Matters; the pack's ``__init__.py`` registers them."""
