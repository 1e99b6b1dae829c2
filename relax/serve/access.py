"""`relax serve`'s access log: one line per request, once its response has ended.

An ASGI middleware around the application (relax.serve.app), logging to the
`relax.serve.access` logger: client, method, path, status, wall time and the fields the
request's handlers noted in `scope["state"]["relax"]` (model, token counts, outcome).
"""

import time

from relax.serve.metrics import access_log


class AccessLog:
    """One line per request once its response has ended: client, method, path, status,
    wall time, and the generation's figures (`_note`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client") or ("-", 0)
            extra = scope.get("state", {}).get("relax", {})
            fields = " ".join(f"{k}={v}" for k, v in extra.items())
            access_log.info(
                '%s:%s "%s %s" %s %.3fs %s', client[0], client[1], scope["method"],
                scope["path"], status[0] or "-", time.perf_counter() - t0, fields,
            )  # fmt: skip
