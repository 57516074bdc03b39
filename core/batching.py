"""Auto-pipelining: every Redis call made in one turn of an event loop shares one pipeline.

Under load, dozens of requests or jobs then cost one Redis round trip instead of one each; a
lone call costs what it would alone. Lua scripts run by their SHA (``EVALSHA``) and are loaded
again when Redis lost them (a restart, ``SCRIPT FLUSH``).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import redis
from redis.asyncio import Redis

from core.connections import RETRY_ON, unavailable

Command = Tuple[Any, ...]  # (name, *args)


class Batcher:
    """Runs Redis commands for the callers of one event loop, batched.

    Parameters:
      redis: a ``redis.asyncio.Redis`` client (``core.connections.connect``).
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._shas: Dict[str, str] = {}  # Lua source -> its SHA1, for EVALSHA
        self._sources: Dict[str, str] = {}  # and back, to load it when Redis lacks it
        self._pending: List[Tuple[Tuple[Command, ...], asyncio.Future]] = []
        self._flusher: Optional[asyncio.Future] = None

    async def eval(self, source: str, keys: List[str], args: List[Any]) -> Any:
        """Run a Lua script by its SHA through ``batched`` (loaded when Redis lacks it)."""
        return (await self.batched(self.command(source, keys, args)))[0]

    def command(self, source: str, keys: List[str], args: List[Any]) -> Command:
        """The EVALSHA command running ``source``; ``batched`` loads it when Redis lacks it."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
            self._sources[sha] = source
        return ("EVALSHA", sha, len(keys), *keys, *args)

    async def batched(self, *commands: Command, return_exceptions: bool = False
                      ) -> List[Any]:
        """Run ``commands`` (each ``(name, *args)``) and return their results, sharing one
        pipeline with every other call made meanwhile on this loop: under load, dozens of
        requests or jobs cost one Redis round trip instead of one each. A command's error is
        raised to its caller only (or returned in its place with ``return_exceptions``);
        Redis unreachable raises ``StateUnavailable`` to all."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((commands, future))
        if self._flusher is None or self._flusher.get_loop() is not loop:
            self._flusher = asyncio.ensure_future(self._flush())
        results: List[Any] = await future
        if not return_exceptions:
            error = next((r for r in results if isinstance(r, Exception)), None)
            if error is not None:
                raise error
        return results

    async def _flush(self) -> None:
        try:
            while self._pending:  # calls made while a pipeline is out go in the next one
                batch, self._pending = self._pending, []
                await self._execute(batch)
        finally:
            self._flusher = None

    async def _execute(self, batch: List[Tuple[Tuple[Command, ...], asyncio.Future]]
                       ) -> None:
        commands = [command for wanted, _ in batch for command in wanted]
        try:
            results = await self.pipelined(lambda pipe: [
                pipe.execute_command(*command) for command in commands], raise_on_error=False)
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                results = await self._reload_scripts(commands, results)
        except Exception as exc:  # unreachable (StateUnavailable) or a bug: fail every caller
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for wanted, future in batch:
            mine, start = results[start:start + len(wanted)], start + len(wanted)
            if not future.done():  # else its caller was cancelled
                future.set_result(mine)

    async def _reload_scripts(self, commands: List[Command], results: List[Any]
                              ) -> List[Any]:
        """After a Redis restart (or SCRIPT FLUSH) load the scripts again and rerun the calls
        that found them missing (NOSCRIPT means the call did nothing)."""
        missing = [i for i, result in enumerate(results)
                   if isinstance(result, redis.exceptions.NoScriptError)]
        for sha in {commands[i][1] for i in missing}:
            await self.guard(self.redis.script_load(self._sources[sha]))
        rerun = await self.pipelined(lambda pipe: [
            pipe.execute_command(*commands[i]) for i in missing], raise_on_error=False)
        results = list(results)
        for i, result in zip(missing, rerun):
            results[i] = result
        return results

    async def pipelined(self, build: Callable[[Any], Any], transaction: bool = False,
                        raise_on_error: bool = True) -> Any:
        """Run the commands ``build`` queues on a pipeline. redis-py does not retry pipelines
        on a dropped connection, so this does (every pipeline here is safe to repeat)."""
        for attempt in range(3):
            try:
                async with self.redis.pipeline(transaction=transaction) as pipe:
                    build(pipe)
                    return await pipe.execute(raise_on_error=raise_on_error)
            except tuple(RETRY_ON) as exc:
                if attempt == 2:
                    raise unavailable(exc) from exc
                await asyncio.sleep(0.05 * 2**attempt)

    async def guard(self, awaitable: Any) -> Any:
        """Await one plain client call, Redis unreachable raising ``StateUnavailable``."""
        try:
            return await awaitable
        except (*RETRY_ON, OSError) as exc:
            raise unavailable(exc) from exc
