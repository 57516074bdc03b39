"""Every event the service publishes, as a plain NATS subscriber sees it: duplicates included.

JetStream drops a publish whose ``Nats-Msg-Id`` it saw within the stream's duplicate window,
so reading the streams back cannot show an event published twice. A core NATS subscription
receives every publish, dropped or not: a test that counts there sees a second publish.
Shared by both suites (Python 3.9).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, List, Sequence

import nats
import redis

from core.keys import Keys
from core.settings import Settings
from tests.waiting import until

SUBJECTS = ("agent.response.>", "orchestration.deliberation.>")


class Recorder:
    """Subscribes to ``subjects`` on ``nats_url`` (in a thread and event loop of its own)
    before it returns, and keeps every message until ``close``."""

    def __init__(self, nats_url: str, subjects: Sequence[str] = SUBJECTS) -> None:
        self._messages: List[Any] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-recorder",
                                        daemon=True)
        self._thread.start()
        self._nc = self._run(self._subscribe(nats_url, subjects))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _subscribe(self, nats_url: str, subjects: Sequence[str]) -> Any:
        nc = await nats.connect(nats_url)

        async def keep(msg: Any) -> None:
            with self._lock:
                self._messages.append(msg)

        for subject in subjects:
            await nc.subscribe(subject, cb=keep)
        await nc.flush()  # the subscriptions are on the server before any publish we await
        return nc

    def of(self, deliberation_id: str, progress: bool = False) -> List[Any]:
        """The messages of one deliberation so far, in arrival order. Partial output
        (``agent.response.progress``: how many depends on timing) only when ``progress``."""
        with self._lock:
            return [m for m in self._messages
                    if deliberation_id in (m.headers or {}).get("Nats-Msg-Id", "")
                    and (progress or not is_progress(m))]

    def wait(self, deliberation_id: str, count: int, timeout: float = 60) -> List[Any]:
        """The deliberation's messages once there are at least ``count``."""
        return until(lambda: len(self.of(deliberation_id)) >= count and
                     self.of(deliberation_id), f"{count} events of {deliberation_id}", timeout)

    def final(self, deliberation_id: str, count: int, settings: Settings,
              timeout: float = 60) -> List[Any]:
        """The deliberation's messages once there are at least ``count`` and ``settings``'
        outbox holds nothing more to publish, so no later publish can come: a test asserts
        on exactly what was published, a second publish of an event included."""
        found = self.wait(deliberation_id, count, timeout)
        client = redis.Redis.from_url(settings.redis_url)
        try:
            until(lambda: client.zcard(Keys(settings.key_prefix).outbox_due) == 0,
                  "the outbox to drain", timeout)
        finally:
            client.close()
        return self.of(deliberation_id) or found

    def close(self) -> None:
        self._run(self._nc.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def is_progress(msg: Any) -> bool:
    return bool(msg.subject.endswith(".progress"))


async def stored(nats_url: str, deliberation_id: str) -> List[Any]:
    """One deliberation's messages stored in the result streams (``SUBJECTS``) but partial
    output (see ``Recorder.of``), each subject
    read from the first message to the last one stored when the read began: every message
    says how many are left after it, so the read ends on that state, not after a quiet gap.
    The streams hold other events too, so neither is ever empty here."""
    nc = await nats.connect(nats_url)
    found: List[Any] = []
    try:
        for subject in SUBJECTS:
            sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
            while True:
                msg = await sub.next_msg(timeout=30)
                if deliberation_id in (msg.headers or {}).get("Nats-Msg-Id", "") \
                        and not is_progress(msg):
                    found.append(msg)
                if msg.metadata.num_pending == 0:
                    break
            await sub.unsubscribe()
    finally:
        await nc.close()
    return found
