"""Text generation: sampling, the step-wise engine, the streaming loop, chat and speculative decoding."""

from llamaherd.generation.engine import ContextWindowError, Engine
from llamaherd.generation.generate import Completion, collect, generate_stream
from llamaherd.generation.sampling import SamplingParams, TokenLogprob
from llamaherd.generation.sequence import Event, Sequence

__all__ = ["Completion", "ContextWindowError", "Engine", "Event", "SamplingParams", "Sequence",
           "TokenLogprob", "collect", "generate_stream"]
