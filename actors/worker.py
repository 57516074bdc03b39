"""The module Dramatiq's worker loads (``dramatiq actors.worker``): our broker and an actor for
every job kind. Importing it opens no connection; each process connects after it boots."""

from __future__ import annotations

import importlib

import dramatiq

from actors.broker import make_broker
from core import logs
from core.settings import Settings

settings = Settings.from_env()
logs.configure(settings.log_level, settings.log_format)
broker = make_broker(settings)
dramatiq.set_broker(broker)

from actors.jobs import declare_actors  # noqa: E402
from cluster import agents  # noqa: E402,F401  (registers the built-in job kinds)

for module in settings.job_modules:
    importlib.import_module(module)
declare_actors(broker)
