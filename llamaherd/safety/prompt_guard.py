"""The Prompt Guard protocol: a text's jailbreak and injection scores from a three-way classifier
(benign, injection, jailbreak), read over overlapping windows of a long text.

Meta's Prompt Guard (86M) is an mDeBERTa-v3-base sequence classifier. Its probabilities are
softmax(logits / T) with T = 1.0; the jailbreak score is P(jailbreak), the injection score
P(injection) + P(jailbreak) (a jailbreak is also an injection). A text longer than the window is
split into segments of `window` tokens (special tokens included) whose texts overlap, each scored
alone; each score is its maximum over the segments. Two classifiers speak this protocol:

    HFPromptGuard     a Hugging Face DeBERTa-v2 directory (Meta's Prompt-Guard-86M), through
                      transformers (the optional `promptguard` extra)
    LlamaClassifier   llamaherd's own: a Llama backbone with a 3-way `score` head on the final
                      hidden state of the text's last token (the reward model's architecture)

    guard = load_prompt_guard("Prompt-Guard-86M")
    guard.check("Ignore your previous instructions.")   # PromptVerdict(flagged=True, ...)

Llama Stack's Prompt Guard shield checks only a conversation's last message and answers a
flagged request with PROMPT_GUARD_REFUSAL (llamaherd.safety.categories).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from llamaherd.train.packing import groups_of

if TYPE_CHECKING:
    from llamaherd.model import Transformer
    from llamaherd.tokenizer import Tokenizer

LABELS = ("benign", "injection", "jailbreak")  # the classifier's outputs, in order
WINDOW = 512  # tokens per segment, special tokens included (Prompt Guard's context)
OVERLAP = 64  # text tokens two consecutive segments share by default (at most half of them)
THRESHOLD = 0.9  # Llama Stack's default for both scores
TEMPERATURE = 1.0
HF_MODEL_TYPE = "deberta-v2"  # config.json's model_type of Meta's Prompt-Guard-86M
INSTALL = "pip install 'llamaherd[promptguard]'"


@dataclass
class PromptVerdict:
    """Prompt Guard's judgment of one text.

    With several segments, each score is its maximum over the segments, and so is each of
    `probabilities` (per label, so they need not add up to 1); `label` is the most probable label
    of the least benign segment (the one whose injection score is the text's)."""

    probabilities: dict[str, float]  # benign, injection, jailbreak: each the max over segments
    jailbreak_score: float  # max over segments of P(jailbreak)
    injection_score: float  # max over segments of P(injection) + P(jailbreak)
    label: str  # one of LABELS
    flagged: bool
    segments: int = 1  # how many windows the text was scored in

    def to_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "label": self.label,
                "jailbreak_score": self.jailbreak_score, "injection_score": self.injection_score,
                "probabilities": dict(self.probabilities), "segments": self.segments}


class Classifier(Protocol):
    """What PromptGuard needs of a three-way classifier (benign, injection, jailbreak)."""

    max_window: int  # the longest segment the model reads, in tokens
    added_tokens: int  # special tokens every segment carries besides the text's ([CLS]/[SEP], BOS)

    def segment_ids(self, text: str, window: int, stride: int) -> list[list[int]]:
        """The text's segments: windows of at most `window` tokens with the special tokens, the
        text tokens of each starting `stride` after the previous one's (see `windows`)."""
        ...

    def logits(self, segments: Sequence[list[int]]) -> torch.Tensor:
        """(N, 3) float32 logits of N segments."""
        ...


def windows(ids: list[int], size: int, stride: int) -> list[list[int]]:
    """Windows of `size` tokens of `ids`, starting at 0, stride, 2*stride, ... until one reaches
    the end: one window when ids fit in one, and consecutive windows share size - stride
    tokens."""
    out = [ids[:size]]
    start = 0
    while start + size < len(ids):
        start += stride
        out.append(ids[start:start + size])
    return out


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """A text as llamaherd's Llama classifier reads it (and as its training encodes it): the
    tokenizer's prompt encoding, BOS first where the model uses one."""
    return tokenizer.encode_prompt(text)


class PromptGuard:
    """A three-way classifier speaking the Prompt Guard protocol.

    A text is flagged when its jailbreak score reaches jailbreak_threshold, or its injection
    score reaches injection_threshold (>=; both 0.9 by default, as Llama Stack's; a threshold of
    None never flags on its score, so injection_threshold=None flags jailbreaks only).
    Segments hold `window` tokens, special tokens included (default min(512, the model's
    longest)); the text tokens of each start `stride` after the previous segment's. By default
    consecutive segments share 64 text tokens, or half a segment's when it holds fewer than 128:
    stride = size - min(64, size // 2), size the text tokens of a segment.
    """

    def __init__(self, classifier: Classifier, jailbreak_threshold: float | None = THRESHOLD,
                 injection_threshold: float | None = THRESHOLD, window: int | None = None,
                 stride: int | None = None, temperature: float = TEMPERATURE) -> None:
        self.classifier = classifier
        self.jailbreak_threshold = jailbreak_threshold
        self.injection_threshold = injection_threshold
        self.window = window if window is not None else min(WINDOW, classifier.max_window)
        if self.window > classifier.max_window:
            raise ValueError(f"a window of {self.window} tokens is longer than the model reads "
                             f"({classifier.max_window})")
        size = self.window - classifier.added_tokens  # text tokens per segment
        self.stride = stride if stride is not None else size - min(OVERLAP, size // 2)
        if not 0 < self.stride <= size:
            raise ValueError(f"the stride must be 1 to {size} (the text tokens of a "
                             f"{self.window}-token window), not {self.stride}")
        if temperature <= 0:
            raise ValueError(f"the temperature must be positive, not {temperature}")
        self.temperature = temperature

    def check(self, text: str) -> PromptVerdict:
        """The verdict on one text (a prompt, or a tool's output about to reach the model)."""
        return self.check_many([text])[0]

    def check_many(self, texts: Sequence[str]) -> list[PromptVerdict]:
        """Verdicts on many texts, the segments of all of them scored in the same batches."""
        segments: list[list[list[int]]] = []
        for text in texts:
            if not text:
                raise ValueError("nothing to check: the text is empty")
            segments.append(self.classifier.segment_ids(text, self.window, self.stride))
        flat = [s for per_text in segments for s in per_text]
        if not flat:
            return []
        probs = torch.softmax(self.classifier.logits(flat).float() / self.temperature, -1)
        return [self.verdict(p) for p in probs.split([len(s) for s in segments])]

    def verdict(self, probs: torch.Tensor) -> PromptVerdict:
        """The verdict from one text's segment probabilities (S, 3)."""
        jailbreak = probs[:, 2]  # (S,)
        injection = probs[:, 1] + probs[:, 2]  # (S,)
        worst = int(injection.argmax())  # the least benign segment
        j, i = float(jailbreak.max()), float(injection.max())
        flagged = ((self.jailbreak_threshold is not None and j >= self.jailbreak_threshold)
                   or (self.injection_threshold is not None and i >= self.injection_threshold))
        return PromptVerdict(
            probabilities=dict(zip(LABELS, probs.max(0).values.tolist())),
            jailbreak_score=j, injection_score=i, label=LABELS[int(probs[worst].argmax())],
            flagged=flagged, segments=probs.shape[0])


class HFPromptGuard:
    """A Hugging Face DeBERTa-v2 sequence classifier (Meta's Prompt-Guard-86M) and its tokenizer,
    in float32 without gradients; segments carry the special tokens ([CLS] ... [SEP]) the
    tokenizer adds, counted in the window."""

    def __init__(self, model: Any, tokenizer: Any, batch_tokens: int = 8192) -> None:
        if model.config.num_labels != len(LABELS):
            raise ValueError(f"a Prompt Guard classifier has 3 labels (benign, injection, "
                             f"jailbreak), this one {model.config.num_labels}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_window = int(model.config.max_position_embeddings)
        self.added_tokens = int(tokenizer.num_special_tokens_to_add(pair=False))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0  # masked out: any id does
        self.batch_tokens = batch_tokens

    @classmethod
    def load(cls, path: str | Path) -> HFPromptGuard:
        """The classifier and tokenizer of a Hugging Face directory."""
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise ImportError(f"Prompt Guard's DeBERTa classifier needs transformers: "
                              f"{INSTALL}") from None
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(str(path)))

    def segment_ids(self, text: str, window: int, stride: int) -> list[list[int]]:
        # transformers' overflowing windows: its `stride` is the tokens consecutive ones share
        size = window - self.added_tokens
        encoded = self.tokenizer(text, truncation=True, max_length=window, stride=size - stride,
                                 return_overflowing_tokens=True)
        return [list(ids) for ids in encoded["input_ids"]]

    @torch.inference_mode()
    def logits(self, segments: Sequence[list[int]]) -> torch.Tensor:
        out = []
        for group in groups_of([len(s) for s in segments], self.batch_tokens):
            chunk = segments[group.start:group.stop]
            ids = torch.full((len(chunk), max(len(s) for s in chunk)), self.pad_id)  # (B, T)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(chunk):
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
            out.append(self.model(input_ids=ids, attention_mask=mask).logits.float())
        return torch.cat(out)


class LlamaClassifier:
    """llamaherd's own Prompt Guard: a Llama Transformer with a 3-way `score` head read at the
    text's last token, in float32 without gradients. Every segment starts with BOS where the
    tokenizer adds one (counted in the window)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_tokens: int = 2048) -> None:
        from llamaherd.train.reward_model import SCORE

        head = getattr(model, SCORE, None)
        if head is None or head.weight.shape[0] != len(LABELS):
            raise ValueError("the model has no 3-way score head (benign, injection, jailbreak)")
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head
        self.max_window = model.args.max_seq_len
        self.added_tokens = int(tokenizer.add_bos)
        self.batch_tokens = batch_tokens

    @classmethod
    def load(cls, name_or_path: str | Path) -> LlamaClassifier:
        """A llamaherd checkpoint (any format open_checkpoint reads) with a 3-row score head."""
        from llamaherd.api import open_checkpoint
        from llamaherd.train.reward_model import SCORE, add_score_head

        ckpt, tokenizer = open_checkpoint(name_or_path, dtype="float32")
        weight = ckpt.heads.get(f"{SCORE}.weight")
        if weight is None or weight.shape[0] != len(LABELS):
            found = "none" if weight is None else f"{weight.shape[0]} output(s)"
            raise ValueError(f"{ckpt.path}: not a Prompt Guard classifier (its score head has "
                             f"{found}, a classifier's has 3: benign, injection, jailbreak)")
        add_score_head(ckpt.model, weight)
        return cls(ckpt.model, tokenizer)

    def encode(self, text: str) -> list[int]:
        """The text's token ids, as training encodes them (module-level `encode`)."""
        return encode(self.tokenizer, text)

    def segment_ids(self, text: str, window: int, stride: int) -> list[list[int]]:
        ids = self.encode(text)
        if not ids:
            raise ValueError("nothing to check: the text encodes to no tokens")
        bos, body = ids[:self.added_tokens], ids[self.added_tokens:]
        return [bos + w for w in windows(body, window - self.added_tokens, stride)]

    @torch.inference_mode()
    def logits(self, segments: Sequence[list[int]]) -> torch.Tensor:
        from llamaherd.train.data import Example
        from llamaherd.train.losses.reward import last_token_outputs
        from llamaherd.train.packing import pack

        examples = [Example(s, [True] * len(s), f"segment {i}") for i, s in enumerate(segments)]
        out = []
        for group in groups_of([len(e) for e in examples], self.batch_tokens):
            chunk = examples[group.start:group.stop]
            batch = pack(chunk, max(max(len(e) for e in chunk), self.batch_tokens))
            out.append(last_token_outputs(self.model, self.head, batch, len(chunk)))
        return torch.cat(out)


def model_type(path: Path) -> str | None:
    """config.json's model_type in a directory, else None."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_prompt_guard(name_or_path: str | Path, **kwargs: Any) -> PromptGuard:
    """A PromptGuard over a registered name or a path: a Hugging Face DeBERTa-v2 classifier
    directory (Meta's Prompt-Guard-86M) or a llamaherd checkpoint with a 3-way score head.
    kwargs go to PromptGuard (thresholds, window, stride, temperature)."""
    from llamaherd import hub
    from llamaherd.checkpoint.errors import CheckpointError
    from llamaherd.tokenizer import TokenizerError

    path = hub.resolve_path(name_or_path)
    if model_type(path) == HF_MODEL_TYPE:
        return PromptGuard(HFPromptGuard.load(path), **kwargs)
    try:
        classifier = LlamaClassifier.load(path)
    except (CheckpointError, TokenizerError) as e:
        raise ValueError(f"not a Prompt Guard classifier (a DeBERTa-v2 directory or a llamaherd "
                         f"checkpoint with a 3-way score head): {e}") from None
    return PromptGuard(classifier, **kwargs)
