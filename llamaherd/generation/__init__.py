"""Text generation: sampling, the step-wise engine, the streaming loop, chat and speculative decoding."""

from llamaherd.generation.chat import ChatCompletion
from llamaherd.generation.engine import ContextWindowError, Engine
from llamaherd.generation.generate import Completion, collect, generate_stream
from llamaherd.generation.sampling import SamplingParams, TokenLogprob
from llamaherd.generation.sequence import Event, Sequence
from llamaherd.generation.speculative import ModelDrafter, NgramDrafter, SpeculativeDecoder

__all__ = ["ChatCompletion", "Completion", "ContextWindowError", "Engine", "Event",
           "ModelDrafter", "NgramDrafter", "SamplingParams", "Sequence", "SpeculativeDecoder",
           "TokenLogprob", "collect", "generate_stream"]
