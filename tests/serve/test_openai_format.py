"""Response objects and stream chunks in OpenAI's shapes."""

from __future__ import annotations

from llamaherd.serve.openai_format import ChatChunks


def test_content_chunks_from_the_template_are_the_same_bytes() -> None:
    """ChatChunks.content (the per-token fast path) writes exactly what chunk() writes."""
    texts = ["a", " the", '"quoted"', "back\\slash", "line\nbreak", "é ✓ 🙂", "\x00\x01", "\u2028"]
    for usage in (True, False):
        chunks = ChatChunks('model "x"', usage)
        for index in (0, 3):
            for text in texts:
                assert chunks.content(index, text) == chunks.chunk(index, {"content": text})
