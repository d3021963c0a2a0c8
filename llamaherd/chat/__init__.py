"""Chat: the typed messages, tools and tool calls every entry point shares; the chat formats
(Llama 2, Llama 3.1, a model's own Jinja template), each with its tool-call syntax; and the one
`build_prompt` / `parse_reply` pair that the Python API and the server both call.

    messages.py   Message, Tool, ToolCall, ParsedMessage
    format.py     the ChatFormat interface and ToolSyntax
    llama2.py, llama3.py, jinja.py   the formats
    toolcalls.py  finding tool calls in model output, in every form Llama-family models write them
    prompt.py     chat_format(), build_prompt(), parse_reply()
"""

from llamaherd.chat.format import ChatFormat, ToolSyntax
from llamaherd.chat.jinja import JinjaChatFormat
from llamaherd.chat.llama2 import Llama2ChatFormat
from llamaherd.chat.llama3 import Llama3ChatFormat
from llamaherd.chat.messages import ChatFormatError, Message, ParsedMessage, Tool, ToolCall
from llamaherd.chat.prompt import build_prompt, chat_format, parse_reply

__all__ = ["ChatFormat", "ChatFormatError", "JinjaChatFormat", "Llama2ChatFormat",
           "Llama3ChatFormat", "Message", "ParsedMessage", "Tool", "ToolCall", "ToolSyntax",
           "build_prompt", "chat_format", "parse_reply"]
