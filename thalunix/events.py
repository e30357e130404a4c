"""One in-process event bus: the runner, jobs and downloads publish; the API's event stream subscribes.

Events are small dicts with a ``type`` (``vm.state``, ``vm.serial``, ``vm.log``,
``job.progress`` …) and the VM's ``vm`` id where it applies. Subscribers get a
bounded queue each, so a slow reader loses its oldest events, never blocks QEMU.

Example::

    bus = EventBus()
    with bus.subscribe() as events:
        bus.publish("vm.state", vm="1f2e", state="running")
        events.get(timeout=1)    # {"type": "vm.state", "vm": "1f2e", "state": "running", "time": ...}
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any, Callable, Iterator


class Subscription:
    """A subscriber's queue; iterate it or call :meth:`get`."""

    def __init__(self, bus: "EventBus", size: int, accept: Callable[[dict[str, Any]], bool] | None) -> None:
        self._bus = bus
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(size)
        self.accept = accept

    def deliver(self, event: dict[str, Any]) -> None:
        if self.accept and not self.accept(event):
            return
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()   # drop the oldest: the newest state matters most

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus._remove(self)


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []

    def publish(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": event_type, "time": time.time(), **fields}
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.deliver(event)
        return event

    @contextlib.contextmanager
    def subscribe(self, size: int = 1000,
                  accept: Callable[[dict[str, Any]], bool] | None = None) -> Iterator[Subscription]:
        subscription = Subscription(self, size, accept)
        with self._lock:
            self._subscribers.append(subscription)
        try:
            yield subscription
        finally:
            subscription.close()

    def _remove(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)
