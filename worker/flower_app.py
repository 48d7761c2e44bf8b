"""What ``grassroots flower`` changes in Flower: its ``/metrics`` behind the same login as every
other page (Flower serves it to anyone: task names, worker names and counts), and a ``Server``
header without Tornado's version. Flower has no option for either, so its command is given our
subclass of its application (``install``), which it builds and runs as its own.
"""

from __future__ import annotations

from typing import Any

import flower.command
import tornado.httputil
import tornado.web
from flower.app import Flower
from flower.views.monitor import Metrics


class LoggedInMetrics(Metrics):  # type: ignore[misc]
    """Flower's ``/metrics``, asking for its credentials as its other pages do (401 without)."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await super().get()


class NoServerVersion(tornado.web.OutputTransform):
    """Every response, static files and errors included, without ``Server: TornadoServer/x.y``:
    a version tells a scanner which advisories to try."""

    def transform_first_chunk(
        self,
        status_code: int,
        headers: tornado.httputil.HTTPHeaders,
        chunk: bytes,
        finishing: bool,
    ) -> tuple[int, tornado.httputil.HTTPHeaders, bytes]:
        headers.pop("Server", None)
        return status_code, headers, chunk


class GrassrootsFlower(Flower):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Rules added later are matched before Flower's own: this /metrics wins.
        self.add_handlers(r".*", [(r"/metrics", LoggedInMetrics)])
        self.add_transform(NoServerVersion)


def install() -> None:
    """Flower's command (run through Celery's) builds our application instead of its own."""
    flower.command.Flower = GrassrootsFlower
