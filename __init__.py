"""ComfyUI entry point of the Patch Matters node pack.

ComfyUI imports this file as a package. Importing it registers model folders and node classes
only: nothing is downloaded or installed, no model is loaded, and no GPU memory is allocated.
A missing package disables only the nodes that need it, with a log line naming the package.
The pack also imports without ComfyUI, for unit tests.
"""

import importlib
import importlib.util
import logging
import os
import sys

logger = logging.getLogger("patch_matters_nodes")

# The core library lives beside this file. ComfyUI does not put a pack's folder on sys.path,
# so it is added here, in front, because a separately installed patch_matters_core would
# otherwise shadow it.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

# (module, node classes with display names, packages the module needs)
_NODE_MODULES = (
    (
        "loader_nodes",
        {
            "PatchMattersVLMLoader": "Patch Matters VLM Loader",
            "PatchMattersLLMLoader": "Patch Matters LLM Loader",
            "PatchMattersDetectorLoader": "Patch Matters Detector Loader",
            "PatchMattersScorerLoader": "Patch Matters Scorer Loader",
        },
        ("PIL",),
    ),
    (
        "stage_nodes",
        {
            "PatchMattersDivide": "Patch Divide",
            "PatchMattersLocalDescribe": "Local Describe",
            "PatchMattersSemanticFilter": "Semantic Filter",
            "PatchMattersHierarchicalAggregate": "Hierarchical Aggregate",
            "PatchMattersCaption": "Patch Matters Caption (all in one)",
        },
        ("torch", "numpy", "PIL", "transformers"),
    ),
)

# Packages that only some models need; without them the pack loads and those models fail with
# an error naming the package.
_MODEL_PACKAGES = {
    "gguf": "GGUF files in the LLM loader",
    "scipy": "OWLv2 detectors",
    "sentencepiece": "SigLIP scorers",
    "num2words": "SmolVLM models",
}

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"


def _register_nodes() -> None:
    for module_name, display_names, packages in _NODE_MODULES:
        missing = [name for name in packages if importlib.util.find_spec(name) is None]
        if missing:
            logger.warning(
                "Patch Matters: nodes %s are disabled because package(s) %s are not installed; "
                "install them with: pip install %s",
                ", ".join(display_names),
                ", ".join(missing),
                " ".join("pillow" if name == "PIL" else name for name in missing),
            )
            continue
        try:
            module = importlib.import_module(f".nodes.{module_name}", __name__)
        except ImportError as error:
            logger.warning(
                "Patch Matters: nodes %s are disabled because an import failed: %s (missing package: %s)",
                ", ".join(display_names),
                error,
                getattr(error, "name", None) or "unknown",
            )
            continue
        for class_name, display_name in display_names.items():
            NODE_CLASS_MAPPINGS[class_name] = getattr(module, class_name)
            NODE_DISPLAY_NAME_MAPPINGS[class_name] = display_name

    for package, users in _MODEL_PACKAGES.items():
        if importlib.util.find_spec(package) is None:
            logger.info("Patch Matters: package %s is not installed, so %s will not load: pip install %s",
                        package, users, package)


def _register_model_folders() -> None:
    try:
        from .nodes import comfy_bridge
    except ImportError as error:
        logger.warning("Patch Matters: model folders not registered: %s", error)
        return
    comfy_bridge.register_model_folders()


def _register_routes() -> None:
    """Add the pack's status route when ComfyUI's server runs; unit tests have no server."""
    try:
        import server

        if getattr(server.PromptServer, "instance", None) is None:
            return
    except ImportError:
        return
    from .nodes import routes  # noqa: F401  (importing registers the route)


_register_model_folders()
_register_nodes()
_register_routes()
logger.info("Patch Matters: %d nodes registered.", len(NODE_CLASS_MAPPINGS))
