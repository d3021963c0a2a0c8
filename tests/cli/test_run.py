"""`llamaherd run` driven the way a person uses it: a real terminal, the real default model."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pexpect
import pytest

PROMPT = ">>> "
BASE = [sys.executable, "-m", "llamaherd.cli", "run"]


def spawn(max_new_tokens: int) -> pexpect.spawn:
    # float32 weights and greedy decoding make the answers checkable
    # Ctrl-C as a terminal gives it, even where the tests run with SIGINT ignored (a job started
    # in the background by a non-interactive shell), which the child would inherit
    child = pexpect.spawn(BASE[0], BASE[1:] + ["--dtype", "float32", "--temperature", "0",
                                               "--max-new-tokens", str(max_new_tokens)],
                          encoding="utf-8", timeout=120, dimensions=(50, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(PROMPT)
    return child


def running(max_new_tokens: int) -> Iterator[pexpect.spawn]:
    """A chat session for a fixture, ended when the test is done."""
    child = spawn(max_new_tokens)
    yield child
    if child.isalive():
        child.terminate(force=True)


@pytest.fixture
def chat():
    yield from running(48)


@pytest.fixture
def long_chat():
    yield from running(4000)


def ask(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def answer_of(reply: str) -> str:
    """The model's text: what the terminal showed after the echoed question."""
    return reply.split("\r\n", 1)[1]


def test_multi_turn_chat_with_system_reset_and_exit(chat) -> None:
    assert "Paris" in ask(chat, "What is the capital of France?")
    in_context = answer_of(ask(chat, "Say hello."))  # a second turn, after the first
    assert "conversation cleared" in ask(chat, "/reset")
    fresh = answer_of(ask(chat, "Say hello."))
    assert in_context.strip() and fresh.strip() and in_context != fresh  # history was used
    assert "system prompt set" in ask(chat, "/system You are a pirate. Talk like a pirate.")
    pirate = answer_of(ask(chat, "Say hello.")).lower()
    assert any(w in pirate for w in ("pirate", "mate", "captain", "arr", "ahoy", "ship"))
    assert "unknown command" in ask(chat, "/nonsense")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_the_answer_but_not_the_chat(long_chat) -> None:
    chat = long_chat
    # an answer of thousands of words (a count to 1000 stops at 20 and could end before Ctrl-C)
    chat.sendline("Write a long story about a dragon named Ember.")
    chat.expect_exact("Ember.\r\n")  # the terminal's echo of the question
    chat.expect(r"(\w+\W+){8}")  # tokens arrive while the answer is still being written
    chat.sendintr()
    chat.expect_exact("[interrupted]")
    chat.expect_exact(PROMPT)
    assert "Paris" in ask(chat, "/reset") + ask(chat, "What is the capital of France?")
    chat.sendintr()  # Ctrl-C at the prompt leaves
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_d_at_the_prompt_exits(chat) -> None:
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_one_shot_question_with_the_default_model() -> None:
    out = subprocess.run(BASE + ["What is the capital of France?", "--dtype", "float32",
                                 "--temperature", "0", "--max-new-tokens", "30"],
                         capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and ">>>" not in out.stdout


def test_unknown_model_path_is_one_line_error() -> None:
    out = subprocess.run(BASE + ["./no/such/model.gguf", "hello"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
