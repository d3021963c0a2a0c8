"""The output shield on a running request: each choice's events held back until the shield has
judged the answer up to them, and a flagged answer stopped.

Every `every` tokens, and once more when a choice ends, the answer so far is judged in context
(the request's conversation, then the answer as the assistant's message: Llama Guard's `Agent`)
while generation goes on. One check runs at a time per choice; when it passes, the events it
covered are released to the client, so nothing the client receives was left unjudged. When it
flags, the choice's sequence is stopped (the others of the request go on), its held events are
dropped, and the client gets the refusal with finish_reason "content_filter".

A check's result comes back through the request's own event queue (a Checked item), so the
request's loop waits on one queue for both the engine's events and the shield's verdicts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llamaherd.generation.sequence import Event
from llamaherd.serve.scheduler import Scheduler
from llamaherd.serve.shields import Message, Shield, Violation

if TYPE_CHECKING:
    from llamaherd.serve.run import Choice


@dataclass
class Checked:
    """A finished check of one choice's answer up to its `upto`-th event (an item of the
    request's event queue)."""

    choice: Choice
    upto: int
    violation: Violation | None


@dataclass
class Watched:
    """One choice's answer as received: its events, how many were released, its text."""

    events: list[Event] = field(default_factory=list)
    released: int = 0  # events a passed check covered (sent on)
    asked: int = 0  # events the latest check covers
    text: str = ""
    checking: bool = False
    flagged: bool = False

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].finish_reason is not None


class OutputWatch:
    """The output shield over one request's choices (see above); `conversation(choice)`: the
    conversation the choice answers."""

    def __init__(self, shield: Shield, conversation: Callable[[Choice], list[Message]],
                 every: int, queue: asyncio.Queue[Any], scheduler: Scheduler) -> None:
        self.shield, self.conversation, self.every = shield, conversation, every
        self.queue, self.scheduler = queue, scheduler
        self._watched: dict[int, Watched] = {}  # choice index ->
        self._tasks: set[asyncio.Task[None]] = set()

    def receive(self, c: Choice, event: Event) -> None:
        """Hold a new event; a check starts when enough are waiting (or the choice ended)."""
        w = self._watched.setdefault(c.index, Watched())
        if w.flagged:  # the stopped sequence's last events
            return
        w.events.append(event)
        w.text += event.text
        self._maybe_check(c, w)

    def checked(self, item: Checked) -> list[tuple[Choice, Event | None]]:
        """A check's result: the events it covered, released, or the choice's end (c, None)
        with its violation set."""
        c, w = item.choice, self._watched[item.choice.index]
        w.checking = False
        if item.violation is not None:
            w.flagged = True
            c.violation, c.finish_reason = item.violation, "content_filter"
            c.event = w.events[-1]  # its tokens count in the usage
            if not w.finished:
                self.scheduler.stop_sequence(w.events[-1].seq)
            return [(c, None)]
        out: list[tuple[Choice, Event | None]] = [(c, e) for e in w.events[w.released:item.upto]]
        w.released = item.upto
        self._maybe_check(c, w)
        return out

    def _maybe_check(self, c: Choice, w: Watched) -> None:
        waiting = len(w.events) - w.asked
        if w.checking or waiting == 0 or (waiting < self.every and not w.finished):
            return
        w.checking, w.asked = True, len(w.events)
        answer = {"role": "assistant", "content": w.text}
        task = asyncio.get_running_loop().create_task(
            self._check(c, w.asked, [*self.conversation(c), answer]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, c: Choice, upto: int, conversation: list[Message]) -> None:
        try:
            violation = await self.shield.violation(conversation, "output")
        except Exception as e:  # noqa: BLE001 -- the request's loop raises it
            self.queue.put_nowait(e)
            return
        self.queue.put_nowait(Checked(c, upto, violation))

    def close(self) -> None:
        """Cancel the checks still running (the request ended or its client left)."""
        for task in list(self._tasks):
            task.cancel()
