"""Prompts for the serving benchmark: random (words or token ids), ShareGPT, or a JSONL file."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

# Common short English words; most are one token in BPE vocabularies (with the leading space).
_WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by hot word but "
    "what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more "
    "day could go come did number sound no most people my over know water than call first who may down side "
    "been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three want air well "
    "also play small end put home read hand port large spell add even land here must big high such follow"
).split()


@dataclass
class BenchRequest:
    prompt: str | list[dict]  # text, or chat messages
    prompt_len: int  # tokens (exact with a tokenizer, else a word count)
    output_len: int


def load_tokenizer(path: str):
    """An HF tokenizer from a directory or hub id, or from a .gguf file."""
    from transformers import AutoTokenizer

    if path.endswith(".gguf") and os.path.isfile(path):
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def _count(text: str, tokenizer) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def _lengths(rng: random.Random, n: int, full: int, ratio: float) -> list[int]:
    lo = max(int(full * ratio), 1)
    return [rng.randint(lo, max(full, lo)) for _ in range(n)]


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, tokenizer,
                    seed: int) -> list[BenchRequest]:
    """Prompts of random words, or of random token ids decoded with ``tokenizer``."""
    rng = random.Random(seed)
    in_lens = _lengths(rng, n, input_len, range_ratio)
    out_lens = _lengths(rng, n, output_len, range_ratio)
    reqs = []
    if tokenizer is None:
        for il, ol in zip(in_lens, out_lens):
            reqs.append(BenchRequest(" ".join(rng.choice(_WORDS) for _ in range(il)), il, ol))
        return reqs
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    for il, ol in zip(in_lens, out_lens):
        text = tokenizer.decode([rng.choice(vocab) for _ in range(il)])
        reqs.append(BenchRequest(text, _count(text, tokenizer), ol))
    return reqs


def sharegpt_requests(path: str, n: int, output_len: int | None, tokenizer, seed: int) -> list[BenchRequest]:
    """First human turn as the prompt; the reply's length as the output length (unless given)."""
    with open(path) as f:
        data = json.load(f)
    rng = random.Random(seed)
    rng.shuffle(data)
    reqs = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        plen = _count(prompt, tokenizer)
        olen = output_len or _count(reply, tokenizer)
        if plen < 4 or olen < 4 or plen > 1024 or plen + olen > 2048:
            continue
        reqs.append(BenchRequest(prompt, plen, olen))
        if len(reqs) == n:
            break
    if not reqs:
        raise ValueError(f"no usable conversations in {path}")
    return reqs


def file_requests(path: str, n: int, output_len: int, tokenizer, seed: int) -> list[BenchRequest]:
    """A JSONL file: each line a string, or {"prompt"|"text": str} / {"messages": [...]},
    with an optional "output_len" or "max_tokens". Lines repeat when fewer than ``n``."""
    items = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if isinstance(obj, str):
                obj = {"prompt": obj}
            prompt = obj.get("messages") or obj.get("prompt") or obj.get("text")
            if not prompt:
                raise ValueError(f"{path}: a line has no prompt, text or messages: {line[:100]}")
            text = prompt if isinstance(prompt, str) else " ".join(m.get("content", "") for m in prompt)
            olen = int(obj.get("output_len") or obj.get("max_tokens") or output_len)
            items.append(BenchRequest(prompt, _count(text, tokenizer), olen))
    if not items:
        raise ValueError(f"no prompts in {path}")
    random.Random(seed).shuffle(items)
    return [items[i % len(items)] for i in range(n)]


def sample_requests(args, n: int, tokenizer, seed: int) -> list[BenchRequest]:
    """The requests that bench_serving's flags ask for."""
    if args.dataset_name == "random":
        return random_requests(n, args.random_input_len, args.random_output_len, args.random_range_ratio,
                               tokenizer, seed)
    if not args.dataset_path:
        raise SystemExit(f"--dataset-name {args.dataset_name} needs --dataset-path")
    if args.dataset_name == "sharegpt":
        return sharegpt_requests(args.dataset_path, n, args.sharegpt_output_len, tokenizer, seed)
    return file_requests(args.dataset_path, n, args.sharegpt_output_len or args.random_output_len, tokenizer,
                         seed)
