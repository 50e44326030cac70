"""HTTP route of the pack on ComfyUI's server: how many models the pack has in memory right now.

``GET /patch_matters/models`` returns the counts of ``models.memory_report``; with "keep
loaded" off they are all zero after a run.
"""

from __future__ import annotations

from aiohttp import web
from server import PromptServer

from .models import memory_report


@PromptServer.instance.routes.get("/patch_matters/models")
async def models_status(request: web.Request) -> web.Response:
    return web.json_response(memory_report())
