"""Typed application state keys (the app is frozen once started; swaps change what these point to)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from m2fpkit.runtime.registry import Registry

from .admission import Admission
from .config import ServerConfig
from .metrics import Metrics
from .quality import GradeBoard
from .routes_state import RoutesState

CONFIG = web.AppKey("config", ServerConfig)
REGISTRY = web.AppKey("registry", Registry)
ROUTES = web.AppKey("routes", RoutesState)
ADMISSION = web.AppKey("admission", Admission)
METRICS = web.AppKey("metrics", Metrics)
BACKGROUND = web.AppKey("background", set[asyncio.Future])
#: the versions' grades, read from the state directory (server/quality.py)
GRADES = web.AppKey("grades", GradeBoard)

#: per-request state
REQUEST_ID = web.RequestKey("request_id", str)
VERSION = web.RequestKey("version", str)
RULE = web.RequestKey("rule", str)
