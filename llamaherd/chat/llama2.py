"""Meta's Llama 2 chat format, written as code (SPECS.md §4)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llamaherd.chat.format import ChatFormat, Segments
from llamaherd.chat.messages import ChatFormatError, Message, Tool, as_messages, as_tools

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2ChatFormat(ChatFormat):
    """`BOS [INST] {user} [/INST] {assistant} EOS` per finished pair, the system prompt folded
    into the first user message. Each turn is encoded on its own, as Meta's reference does (so
    each gets SentencePiece's space prefix); `[INST]` is plain text in this vocabulary. Llama 2
    has no tool calling."""

    def turns(self, messages: Sequence[Message], tools: list[Tool]) -> list[tuple[str, bool]]:
        """(turn text, closed with EOS) for each turn."""
        if tools:
            raise ChatFormatError("the Llama 2 chat format has no tool calling")
        msgs = list(messages)
        if msgs[0].role == "system":
            if len(msgs) < 2 or msgs[1].role != "user":
                raise ChatFormatError("a Llama 2 system message must be followed by a user message")
            msgs = [Message("user", B_SYS + msgs[0].text() + E_SYS + msgs[1].text()), *msgs[2:]]
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            if m.role != want:
                raise ChatFormatError(f"Llama 2 dialogs alternate user/assistant (after an optional "
                                      f"system message); message {i} is {m.role!r}")
        out = [(f"{B_INST} {u.text().strip()} {E_INST} {a.text().strip()} ", True)
               for u, a in zip(msgs[::2], msgs[1::2])]
        if len(msgs) % 2:
            out.append((f"{B_INST} {msgs[-1].text().strip()} {E_INST}", False))
        return out

    def encode_dialog(self, messages: Iterable[Message | Mapping[str, Any]],
                      tools: Iterable[str | Mapping[str, Any] | Tool] | None = None,
                      add_generation_prompt: bool = True) -> list[int]:
        ids: list[int] = []
        for text, closed in self.turns(as_messages(messages), as_tools(tools)):
            ids += self.tok.encode(text, bos=True, eos=closed)
        return ids

    def segments(self, messages: Sequence[Message], tools: list[Tool],
                 add_generation_prompt: bool) -> Segments:
        bos = self.tok.id_to_piece(self.tok.bos_id)
        eos = self.tok.id_to_piece(self.tok.eos_id)
        segs: Segments = []
        for text, closed in self.turns(messages, tools):
            segs += [(bos, True), (text, False)] + ([(eos, True)] if closed else [])
        return segs
