"""Build ``reasoning_lengths_skythought_qwen25.json``: the completion-length histogram (in tokens) of real long
chain-of-thought completions, for ``bench_rollout.py --lengths histogram``.

Source: the evaluation outputs that NovaSky-AI/SkyThought committed on its ``corrupt`` branch (Apache-2.0), the
greedy (temperature 0, max_tokens 32768, vLLM) completions of Qwen2.5-14B/32B-Instruct models fine-tuned on
5k-17k long chain-of-thought math traces ("Sky-T1-math-*": correct / wrong-answer / corrupted / reflection-edited
traces, and 11 checkpoints of one 32B SFT run) on AIME 2024 and AMC 2023. Each jsonl line holds one problem and its
completion text in ``code[0]``. Token counts: the completion text re-encoded with the Qwen2 / Qwen2.5 byte-level BPE
(its ``vocab.json`` + ``merges.txt`` and the Qwen2 pre-tokenizer regex, NFC normalizer, no special tokens added),
i.e. the models' own tokenizer; a re-encoding can differ from the sampled ids by a token or so per completion.

    python benchmarks/data/make_length_histogram.py --src-root DIR --tokenizer-dir TOKDIR \
        --out benchmarks/data/reasoning_lengths_skythought_qwen25.json

``DIR`` holds the repository's files at ``SOURCE['commit']`` (e.g. ``git show COMMIT:PATH > DIR/PATH`` for the
paths in ``FILES``); ``TOKDIR`` holds a Qwen2 ``vocab.json`` and ``merges.txt``. Only the histogram is committed,
never the source texts.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

SOURCE = {
    "repository": "github.com/NovaSky-AI/SkyThought",
    "branch": "corrupt",
    "commit": "9a750c725525201a16bcb2df386495da61371577",
    "license": "Apache-2.0 (repository LICENSE); only derived counts are stored here, no text",
    "generator": "vLLM greedy decoding (temperature 0, top_p 1, n 1, max_tokens_per_call 32768) by "
                 "skythought/Qwen2.5-Math/evaluation/math_eval.py (sh/eval.sh), prompt type 'Sky-T1'",
    "models": "Qwen2.5-14B-Instruct and Qwen2.5-32B-Instruct full-SFT on Sky-T1 long-CoT math traces (LLaMA-Factory "
              "configs train_full/qwen2_full_sft_{14B,32B}*.yaml, cutoff_len 16384): Sky-T1-math-correct-5K-14B, "
              "Sky-T1-math-wrong-5K-14B, Sky-T1-math-correct-5K-32B checkpoints 21..140 (one SFT run), "
              "Sky-T1-math-corrupt-{0.2,0.5,0.7}-32B, Sky-T1-math-reflection-{0.2,0.5,1.0}-32B",
    "benchmarks": "AIME 2024 (30 problems), AMC 2023 (40 problems)",
    "left_out": "gemma-2-27b fine-tunes (another tokenizer), the '-short' short-CoT 32B fine-tune, base models, and "
                "files of 4 MiB or more (the MATH500 / OlympiadBench / Minerva outputs of the Qwen fine-tunes: "
                "absent from the snapshot used)",
}
PREFIX = "skythought/Qwen2.5-Math/evaluation/outputs/"
FILES = [
    "home/ubuntu/skyov1-dl/Sky-T1-math-correct-5K-14B/aime24_eval/aime24/test_Sky-T1_-1_seed0_t0.0_s0_e-1.jsonl",
    "home/ubuntu/skyov1-dl/Sky-T1-math-correct-5K-14B/amc23_eval/amc23/test_Sky-T1_-1_seed0_t0.0_s0_e-1.jsonl",
    "home/ubuntu/skyov1-dl/Sky-T1-math-wrong-5K-14B/aime24_eval/aime24/test_Sky-T1_-1_seed0_t0.0_s0_e-1.jsonl",
    "home/ubuntu/skyov1-dl/Sky-T1-math-wrong-5K-14B/amc23_eval/amc23/test_Sky-T1_-1_seed0_t0.0_s0_e-1.jsonl",
    *[f"icml_models/Sky-T1-math-correct-5K-32B-ckpts/checkpoint-{k}/aime24_eval/aime24/"
      "test_Sky-T1_-1_seed0_t0.0_s0_e-1.jsonl" for k in (21, 35, 49, 63, 70, 84, 98, 105, 119, 133, 140)],
    *[f"icml_models/Sky-T1-math-{m}-32B/{b}_eval/{b}/test_Sky-T1_-1_seed0_t0.0_s0_e-1.jsonl"
      for m, bs in (("corrupt-0.2", ("aime24", "amc23")), ("corrupt-0.5", ("aime24", "amc23")),
                    ("corrupt-0.7", ("amc23",)), ("reflection-0.2", ("aime24", "amc23")),
                    ("reflection-0.5", ("aime24", "amc23")), ("reflection-1.0", ("aime24", "amc23")))
      for b in bs],
]
BUDGET = 32768  # the source's max new tokens
BIN = 256  # histogram bin width in tokens
CUT = 32000  # completions at least this long ran into the 32,768-token context (prompt + completion)

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / Qwen2.5), then byte-level BPE
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen2_tokenizer(directory: str):
    """The Qwen2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (no special tokens: completions are text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.rstrip("\n").split(" ")) for line in f
                  if line.strip() and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src-root", required=True)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    tok = qwen2_tokenizer(args.tokenizer_dir)
    assert tok.encode("Hello world").ids == [9707, 1879], "not the Qwen2 vocabulary"
    lengths, per_file = [], []
    for rel in FILES:
        with open(os.path.join(args.src_root, PREFIX, rel), encoding="utf-8") as f:
            texts = [json.loads(line)["code"][0] for line in f if line.strip()]
        n = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
        lengths += n
        per_file.append({"path": PREFIX + rel, "completions": len(n), "mean_tokens": round(float(np.mean(n)), 1)})
    x = np.asarray(lengths)
    edges = np.arange(0, BUDGET + BIN, BIN)
    counts, _ = np.histogram(np.minimum(x, BUDGET), bins=edges)
    q = {f"p{p}": int(np.percentile(x, p)) for p in (10, 25, 50, 75, 90, 95, 99)}
    out = {
        "description": "Completion lengths (tokens) of real long chain-of-thought math completions; bin i counts "
                       "lengths in [bin_edges[i], bin_edges[i+1]) (the last bin includes the budget).",
        "source": SOURCE,
        "tokenizer": "Qwen2 / Qwen2.5 byte-level BPE (vocab.json + merges.txt of a Qwen2-1.5B-Instruct copy, "
                     "151,643 BPE tokens; Qwen2 pre-tokenizer regex; NFC); the completion text re-encoded, no "
                     "special tokens",
        "tokenizer_check": "on 48 of these completions (869,996 tokens) the counts equal, completion by completion, "
                           "those of tiktoken with Qwen's qwen.tiktoken ranks and the same split pattern",
        "budget_tokens": BUDGET,
        "completions": int(x.size),
        "mean": round(float(x.mean()), 1), "min": int(x.min()), "max": int(x.max()), **q,
        # vLLM's max_model_len 32768 bounds prompt + completion: a completion of >= 32000 tokens was cut there
        "cut_at_context_limit": int(np.sum(x >= CUT)),
        "below_limit": {"completions": int(np.sum(x < CUT)), "mean": round(float(x[x < CUT].mean()), 1),
                        "p50": int(np.median(x[x < CUT])), "p90": int(np.percentile(x[x < CUT], 90))},
        "files": per_file,
        "bin_width": BIN,
        "bin_edges": edges.tolist(),
        "counts": counts.tolist(),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print({k: v for k, v in out.items() if k not in ("bin_edges", "counts", "files", "source")})
    return out


if __name__ == "__main__":
    main()
