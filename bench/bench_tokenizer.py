"""Encode throughput of llamaherd's tokenizers next to each vocabulary's reference library.

    python bench/bench_tokenizer.py [--kb 512] [--seconds 2]

Prints a table and writes bench/results/tokenizer.json. Two workloads on the same text: one long
document (the test corpus repeated to --kb kilobytes) and the corpus's strings one call each.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from llamaherd import hub
from llamaherd.tokenizer import load

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
CORPUS: list[str] = json.loads(
    (ROOT / "tests" / "tokenizer" / "data" / "tokenizer_corpus.json").read_text(encoding="utf-8"))["strings"]
Encode = Callable[[str], list[int]]


def tiktoken_reference(model: Path) -> Encode:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from llamaherd.tokenizer.tiktoken_bpe import LLAMA3_PATTERN

    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN,
                            mergeable_ranks=load_tiktoken_bpe(str(model)), special_tokens={})
    return enc.encode_ordinary


def sentencepiece_reference(gguf_path: Path) -> Encode:
    import sentencepiece as spm

    from llamaherd.checkpoint.gguf import read_metadata
    from llamaherd.tokenizer.spm import build_proto

    m = read_metadata(gguf_path)
    proto = build_proto(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"],
                        m["tokenizer.ggml.token_type"], unk_id=0, bos_id=1, eos_id=2)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()).encode


def tokenizers_reference(path: Path) -> Encode:
    import tokenizers

    tk = tokenizers.Tokenizer.from_file(str(path))
    tk.encode_special_tokens = True  # special-token text stays text, as in llamaherd's encode
    return lambda s: tk.encode(s, add_special_tokens=False).ids


def transformers_reference(gguf_path: Path) -> Encode:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return lambda s: hf.encode(s, add_special_tokens=False, split_special_tokens=True)


def throughput(encoders: list[Encode], texts: list[str], seconds: float) -> list[float]:
    """Best MB/s of each encoder over encoding every text once, timing the encoders in turn
    (so that load from other processes hits them alike) for about `seconds` in all."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    best = [float("inf")] * len(encoders)
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        for k, encode in enumerate(encoders):
            start = time.perf_counter()
            for t in texts:
                encode(t)
            best[k] = min(best[k], time.perf_counter() - start)
        rounds += 1
    return [nbytes / b / 1e6 for b in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kb", type=int, default=512, help="size of the long document")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer.json")
    args = ap.parse_args()

    doc = "\n".join(CORPUS)
    doc = (doc + "\n") * (args.kb * 1024 // len(doc.encode("utf-8")) + 1)
    llama3_dir = hub.pull("llama3-tokenizer", quiet=True).parent
    smollm = hub.pull("smollm2-135m-instruct", quiet=True)
    cases = [  # (vocabulary, our source, reference name, reference builder)
        ("Llama 3 (GGUF gpt2/llama-bpe)", FIXTURES / "ggml-vocab-llama-bpe.gguf", "tiktoken",
         lambda: tiktoken_reference(llama3_dir / "tokenizer.model")),
        ("Llama 3 (tokenizer.model)", llama3_dir / "tokenizer.model", "tiktoken",
         lambda: tiktoken_reference(llama3_dir / "tokenizer.model")),
        ("Llama 3 (tokenizer.json)", llama3_dir / "tokenizer.json", "tokenizers",
         lambda: tokenizers_reference(llama3_dir / "tokenizer.json")),
        ("Llama 2 (GGUF llama/SentencePiece)", FIXTURES / "ggml-vocab-llama-spm.gguf",
         "sentencepiece", lambda: sentencepiece_reference(FIXTURES / "ggml-vocab-llama-spm.gguf")),
        ("SmolLM2 (GGUF gpt2/smollm)", smollm, "transformers",
         lambda: transformers_reference(smollm)),
    ]
    rows = []
    for name, source, ref_name, make_ref in cases:
        ours, ref = load(source).encode, make_ref()
        for workload, texts in (("document", [doc]), ("strings", CORPUS)):
            mine, theirs = throughput([ours, ref], texts, args.seconds)
            rows.append({"vocabulary": name, "workload": workload, "reference": ref_name,
                         "llamaherd_mb_s": round(mine, 2), "reference_mb_s": round(theirs, 2)})
            print(".", end="", flush=True)
    print()
    header = f"| {'vocabulary':36} | workload | reference     | llamaherd MB/s | reference MB/s | ratio |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        ratio = r["llamaherd_mb_s"] / r["reference_mb_s"]
        print(f"| {r['vocabulary']:36} | {r['workload']:8} | {r['reference']:13} | "
              f"{r['llamaherd_mb_s']:14.2f} | {r['reference_mb_s']:14.2f} | {ratio:5.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "document_bytes": len(doc.encode("utf-8")), "strings": len(CORPUS),
        "seconds_per_row": args.seconds, "machine": platform.machine(), "python": platform.python_version(),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
