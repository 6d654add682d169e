"""The control API's tunnel routes (registered on the control server's application, so they
share its error handling): ``/v1/services`` (what this site exposes; ``?remote=1``: what
members expose to it) and ``/v1/tunnels`` (what this site consumes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from meshd.daemon.tunnels.service import TunnelService
from meshd.errors import LocalError
from meshd.local import api
from meshd.state.tunnels import EVERYONE


def add_routes(app: web.Application, tunnels: TunnelService, find_site: Callable[[str], bytes],
               body: Callable[[web.Request], Any], field: Callable[..., Any],
               answer: Callable[[Any], web.Response]) -> None:
    """``body``, ``field`` and ``answer`` are the control server's request and answer helpers."""

    async def services(request: web.Request) -> web.Response:
        if request.query.get("remote") in ("1", "true", "yes"):
            return answer(await tunnels.remote_services())
        return answer(tunnels.services())

    async def expose(request: web.Request) -> web.Response:
        data = await body(request)
        allow = field(data, "allow", list)
        if not allow or not all(isinstance(a, str) and a for a in allow):
            raise LocalError("allow must list site names (or '*' for every member)",
                             reason="usage")
        keys = None if EVERYONE in allow else [find_site(a) for a in allow]
        return answer(tunnels.expose(field(data, "name", str), field(data, "target", str), keys,
                                     update=field(data, "update", bool, False)))

    async def unexpose(request: web.Request) -> web.Response:
        return answer(tunnels.unexpose(request.match_info["name"]))

    async def list_tunnels(request: web.Request) -> web.Response:
        return answer(tunnels.tunnels())

    async def connect(request: web.Request) -> web.Response:
        data = await body(request)
        key = find_site(field(data, "site", str))
        return answer(await tunnels.connect(key, field(data, "name", str),
                                            field(data, "listen", str, None)))

    async def disconnect(request: web.Request) -> web.Response:
        key = find_site(request.match_info["site"])
        return answer(tunnels.disconnect(key, request.match_info["name"]))

    app.add_routes([
        web.get(api.SERVICES, services),
        web.post(api.SERVICES, expose),
        web.delete(api.SERVICES + "/{name}", unexpose),
        web.get(api.TUNNELS, list_tunnels),
        web.post(api.TUNNELS, connect),
        web.delete(api.TUNNELS + "/{site}/{name}", disconnect),
    ])
