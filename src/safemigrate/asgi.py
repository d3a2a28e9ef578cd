"""ASGI middleware that applies the shared degradation level to every request.

    from safemigrate.asgi import DegradationMiddleware

    app = DegradationMiddleware(app, "postgresql://app@db/cards",
                                feature_routes={"/search": "search", "/export": "export"})

Plain ASGI, no framework needed (Starlette, FastAPI, Django, Quart…). Per request, in order:

1. the health path(s) always pass (so load balancers see the process alive);
2. maintenance: 503 with ``Retry-After`` for everything else;
3. a route whose feature the level disables: 503 with ``Retry-After``;
4. more than the level's ``requests_per_minute`` from one client: 429 with ``Retry-After``
   (the `limits` library; a moving window in memory by default, any `limits` storage URI such
   as ``redis://…`` to share the count between processes);
5. more than ``concurrent_connections`` requests in flight from one client, or more than
   ``max_concurrent_users`` clients with requests in flight: 503 with ``Retry-After``.

Every response carries ``X-Degradation-Level``. The level is read through `Degradation`, so
the database sees at most one query per client TTL (off the event loop). In-flight counts are
per process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.strategies import STRATEGIES
from limits.storage import storage_from_string
from sqlalchemy.engine import URL

from ._exceptions import ConfigError
from .degrade import Degradation, DegradationState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
FeatureOf = Callable[[Scope], "str | Iterable[str] | None"]

HEADER = b"x-degradation-level"


class DegradationMiddleware:
    """Wraps an ASGI app. `degradation` is a database URL (as the CLI takes it) or a
    `Degradation` client. `feature_routes` maps path prefixes to feature names (the longest
    prefix wins, on a path-segment boundary), or is a callable `scope -> feature(s) or None`.
    Routes of no feature are only stopped by maintenance and the limits. `client_key` names the
    client a request counts against (default: its IP address)."""

    def __init__(self, app: ASGIApp, degradation: str | os.PathLike[str] | URL | Degradation, *,
                 feature_routes: Mapping[str, str] | FeatureOf | None = None,
                 health_path: str | Iterable[str] = "/health",
                 client_key: Callable[[Scope], str] | None = None,
                 storage_uri: str = "memory://", strategy: str = "moving-window",
                 ttl: float | None = None) -> None:
        self.app = app
        self.degradation = (degradation if isinstance(degradation, Degradation)
                            else Degradation(degradation, ttl=ttl))
        if callable(feature_routes):
            self._feature_of: FeatureOf = feature_routes
        else:
            routes = sorted((feature_routes or {}).items(), key=lambda kv: -len(kv[0]))
            self._feature_of = lambda scope: _match(routes, scope.get("path", ""))
        self.health_paths = {health_path} if isinstance(health_path, str) else set(health_path)
        self.client_key = client_key or _client_ip
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown rate-limit strategy {strategy!r}",
                              "strategies: " + ", ".join(sorted(STRATEGIES)))
        uri = storage_uri if storage_uri.startswith("async+") else "async+" + storage_uri
        self.limiter = STRATEGIES[strategy](storage_from_string(uri))
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = await self._state()
        level = state.level.encode()
        if scope.get("path") in self.health_paths:
            await self.app(scope, receive, _with_header(send, level))
            return
        refusal = await self._refusal(scope, state)
        if refusal is not None:
            await _refuse(scope, send, state, *refusal)
            return
        client = self.client_key(scope)
        cfg = state.config
        if cfg.concurrent_connections and self.in_flight.get(client, 0) >= cfg.concurrent_connections:
            await _refuse(scope, send, state, 503, 1, {
                "error": "too_many_connections", "limit": cfg.concurrent_connections})
            return
        if (cfg.max_concurrent_users and client not in self.in_flight
                and len(self.in_flight) >= cfg.max_concurrent_users):
            await _refuse(scope, send, state, 503, 1, {
                "error": "too_many_users", "limit": cfg.max_concurrent_users})
            return
        self.in_flight[client] = self.in_flight.get(client, 0) + 1
        try:
            await self.app(scope, receive, _with_header(send, level))
        finally:
            left = self.in_flight[client] - 1
            if left:
                self.in_flight[client] = left
            else:
                del self.in_flight[client]

    async def _state(self) -> DegradationState:
        if self.degradation.fresh:
            return self.degradation.state()
        return await asyncio.to_thread(self.degradation.state)

    async def _refusal(self, scope: Scope, state: DegradationState
                       ) -> tuple[int, int, dict[str, Any]] | None:
        """(status, retry-after seconds, body) when the request must not reach the app."""
        cfg = state.config
        retry = cfg.retry_after or 60
        if state.maintenance:
            return 503, retry, {"error": "maintenance", "message": cfg.message}
        found = self._feature_of(scope)
        features = [found] if isinstance(found, str) else list(found or ())
        for feature in features:
            if not state.is_enabled(feature):
                return 503, retry, {"error": "feature_disabled", "feature": feature,
                                    "message": cfg.message}
        if cfg.requests_per_minute:
            item = RateLimitItemPerMinute(cfg.requests_per_minute)
            keys = ("safemigrate", state.level, self.client_key(scope))
            if not await self.limiter.hit(item, *keys):
                stats = await self.limiter.get_window_stats(item, *keys)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                return 429, wait, {"error": "rate_limited", "limit": cfg.requests_per_minute,
                                   "window": "1 minute"}
        return None


def _match(routes: list[tuple[str, str]], path: str) -> str | None:
    for prefix, feature in routes:
        stem = prefix.rstrip("/")
        if path in (prefix, stem) or path.startswith(stem + "/"):
            return feature
    return None


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _with_header(send: Send, level: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
            message = {**message, "headers": [*headers, (HEADER, level)]}
        await send(message)
    return wrapped


async def _refuse(scope: Scope, send: Send, state: DegradationState, status: int, retry_after: int,
                  body: dict[str, Any]) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1013})  # try again later
        return
    payload = json.dumps({**body, "level": state.level, "retry_after": retry_after}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", str(retry_after).encode()),
        (b"cache-control", b"no-store"),
        (HEADER, state.level.encode()),
    ]})
    await send({"type": "http.response.body", "body": payload})
