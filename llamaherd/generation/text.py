"""Incremental text of one sequence, holding back whatever might still become a stop string."""

from __future__ import annotations

from llamaherd.tokenizer import StreamDecoder


class TextStream:
    """Turns token ids into text deltas; stop strings are cut out and never emitted.

    Text that could be the start of a stop string is held back until it can no longer match, so a
    consumer never sees part of a stop string. `decoder` is a tokenizer's `stream_decoder()` (which
    never splits a UTF-8 character).
    """

    def __init__(self, decoder: StreamDecoder, stop: list[str]) -> None:
        self.decoder = decoder
        self.stop = stop
        self.held = ""  # decoded text not emitted yet

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Feed one token; return (text safe to emit, the stop string matched or None)."""
        self.held += self.decoder.push(token_id)
        if not self.stop:
            out, self.held = self.held, ""
            return out, None
        hit = self._find_stop()
        if hit is not None:
            at, s = hit
            out, self.held = self.held[:at], ""
            return out, s
        keep = self._partial_suffix()
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out, None

    def finish(self) -> str:
        """The rest of the text when generation ends without a stop string."""
        self.held += self.decoder.flush()
        hit = self._find_stop() if self.stop else None
        out = self.held if hit is None else self.held[:hit[0]]
        self.held = ""
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        """Earliest stop string in the held text, as (index, string)."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.held.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        return best

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of the held text that begins some stop string."""
        longest = min(len(self.held), max(len(s) for s in self.stop) - 1)
        for n in range(longest, 0, -1):
            tail = self.held[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
