"""``/playground``: a page to compose mixes and compare them side by side, served by mixserve itself.

Static HTML + JS shipped in the package (``server/entrypoints/static/``): no build step, nothing fetched from the
internet. The page talks to the public API (``/v1/models``, ``/generate``, ``/metrics``, ``/ready``)
with the API key a person enters, and to ``/admin/mixes`` only with an admin token entered.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from merging.methods import METHODS

router = APIRouter()


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    page = resources.files("server.entrypoints").joinpath("static/playground.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/playground/methods")
async def methods() -> dict:
    """The merge methods the page offers, with their declared parameters and defaults (the registry)."""
    return {
        "methods": [
            {
                "name": m.name,
                "summary": m.summary,
                "paper": m.paper,
                "params": {p: m.default(p) for p in m.params},
            }
            for m in METHODS.values()
        ]
    }
