"""Quality of --torchao-config on the embedded SmolLM2-135M: quantized vs unquantized logits.

For 50 fixed prompts (one batched prefill, the logits of every position), reports per run: top-1
next-token agreement (every position, and each prompt's last position only) and the mean
KL(unquantized || quantized) over all positions. Runs on the CPU, where int4 is emulated with the
numbers the GPU kernels compute (dequantize, then matmul: EDGELM_INT4_CPU=emulate, set here; the
server's CPU int4 kernel rounds activations to bf16 on top).

A run is CONFIG[:METHOD]. For int4wo-*, METHOD is how codes are chosen: search (the data-free
range search that --torchao-config uses), minmax, gptq or gptq-actorder (GPTQ on CALIBRATION text,
which the prompts do not overlap; not what the server does: it has no calibration data).
search-unscaled is search without int4wo's down_proj input scaling (edgelm.quantization.down_scale).
search-weighted (an experiment, not what the server does) weighs each input's error in the range search by a
data-free estimate of its x² (input_importances: the RMSNorm weight squared before qkv_proj and gate_up_proj,
v's expected square before o_proj, down_scale's channel RMS squared before down_proj).
METHOD@LINEAR quantizes only the linears whose names end with LINEAR (e.g. search@down_proj): where the
loss comes from.
A run ending in +int8head also makes the LM head int8 (--quantize-lm-head int8); CONFIG none: the head alone
(none+int8head).

    PYTHONPATH=. .venv/bin/python benchmarks/quant_quality.py \
        --runs int4wo-128:search,int4wo-128:minmax,int4wo-128:gptq-actorder,int8wo \
        --out benchmarks/results/quant_quality.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time

import torch

os.environ.setdefault("EDGELM_INT4_CPU", "emulate")

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "The quick brown fox jumps over the",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The largest planet in our solar system is",
    "Once upon a time, in a small village by the sea, there lived",
    "To make a cup of tea, first you need to",
    "The three primary colors are red, blue and",
    "Albert Einstein is best known for his theory of",
    "The Great Wall of China was built to",
    "import numpy as np\n\narr = np.zeros((3, 4))\nprint(arr.",
    "The human heart has four chambers: two atria and two",
    "Shakespeare wrote many famous plays, including Hamlet, Macbeth and",
    "The speed of light in a vacuum is approximately",
    "A haiku is a short poem with three lines of five, seven and",
    "The main ingredients of bread are flour, water, yeast and",
    "Machine learning is a field of computer science that",
    "The French Revolution began in the year",
    "My favourite way to spend a rainy Sunday afternoon is",
    "The chemical symbol for gold is",
    "SELECT name, age FROM users WHERE",
    "The Amazon rainforest is home to",
    "Dear hiring manager, I am writing to apply for the position of",
    "The mitochondria is often called the powerhouse of the",
    "In mathematics, a prime number is a number that",
    "The Eiffel Tower is located in",
    "Climate change is caused mainly by",
    "The best advice I ever received was",
    "for i in range(10):\n    print(",
    "Mount Everest is the highest mountain in the world, with a height of",
    "The theory of evolution by natural selection was proposed by",
    "A balanced diet should include fruits, vegetables,",
    "The Pacific Ocean is the largest ocean on Earth and covers",
    "Question: What is 12 times 12?\nAnswer:",
    "The stock market crashed in 1929, leading to",
    "Bees are important for the environment because they",
    "The Mona Lisa was painted by",
    "In the morning, I like to drink a cup of coffee and",
    "The internet was originally developed as a project of",
    "Translate to French: 'Good morning, how are you?'\nFrench:",
    "The Roman Empire fell in the year",
    "A good night's sleep is important because",
    "The planet closest to the Sun is",
    "Python is a popular programming language because",
    "The first step in solving a quadratic equation is to",
    "Dogs are often called man's best friend because",
    "The Industrial Revolution started in Britain in the",
    "User: Can you recommend a good book to read?\nAssistant:",
]

# Calibration text for --method gptq: none of it overlaps the evaluation prompts above.
CALIBRATION = [
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and France "
    "built wooden running machines that riders pushed along with their feet. Pedals came decades later, and the "
    "chain drive and pneumatic tyres turned the bicycle into a practical machine for millions of people.",
    "To reset your password, open the settings page, choose the account tab and click 'Forgot password'. You "
    "will receive an email with a link that expires after twenty-four hours. If the email does not arrive, "
    "check your spam folder or contact support.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        if not self.items:\n"
    "            raise IndexError('pop from empty stack')\n        return self.items.pop()\n",
    "Volcanoes form where molten rock from the mantle reaches the surface. Some erupt explosively, throwing ash "
    "high into the atmosphere, while others release slow rivers of lava that can flow for kilometres.",
    "User: What is a good way to learn a new language?\nAssistant: Practise a little every day, listen to "
    "native speakers, and do not be afraid of making mistakes. Reading simple books and keeping a vocabulary "
    "notebook also help a lot.",
    "The recipe serves four. Chop two onions and three cloves of garlic, fry them gently in olive oil, add a "
    "tin of tomatoes and a pinch of salt, and let the sauce simmer for twenty minutes before stirring in "
    "fresh basil.",
    "In economics, inflation is the rate at which the general level of prices rises. Central banks try to keep "
    "it low and stable, usually by adjusting interest rates.",
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. Ships passing the "
    "rocky coast relied on its beam, and in forty years not one had run aground on his watch.",
    "function debounce(fn, wait) {\n  let timer;\n  return (...args) => {\n    clearTimeout(timer);\n"
    "    timer = setTimeout(() => fn(...args), wait);\n  };\n}\n",
    "Octopuses have three hearts and blue blood. They can change the colour and texture of their skin in a "
    "fraction of a second, and they are known for solving puzzles and escaping from aquariums.",
    "Step 1: Preheat the oven to 180 degrees. Step 2: Mix the flour, sugar and butter in a large bowl. "
    "Step 3: Add the eggs one at a time. Step 4: Pour the batter into a tin and bake for forty minutes.",
    "Renewable energy sources such as wind, solar and hydroelectric power produce electricity without burning "
    "fossil fuels. Their share of the world's energy supply has grown quickly over the last two decades.",
    "Dear team, thank you all for your hard work this quarter. We shipped three major releases, fixed over two "
    "hundred bugs and welcomed five new colleagues. Let's keep the momentum going.",
    "A triangle's angles always add up to one hundred and eighty degrees. In a right triangle, the square of "
    "the hypotenuse equals the sum of the squares of the other two sides.",
    "The museum's new exhibition brings together paintings, sculptures and photographs from five centuries, "
    "exploring how artists have depicted cities, rivers and the changing seasons.",
    "User: How do I sort a list of dictionaries by a key in Python?\nAssistant: Use the sorted function with "
    "a key argument, for example sorted(items, key=lambda d: d['age']).",
    "Glaciers are slowly moving rivers of ice. As they advance, they carve valleys and carry rocks over long "
    "distances; as the climate warms, many of them are retreating.",
    "The orchestra tuned their instruments as the audience settled into their seats. When the conductor raised "
    "his baton, the hall fell silent, and the first notes of the symphony filled the room.",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, total REAL, "
    "created_at TEXT DEFAULT CURRENT_TIMESTAMP);",
    "Sleep plays a vital role in memory, mood and physical health. Most adults need between seven and nine "
    "hours a night, and regular sleep times help the body keep its internal clock.",
]


INT4_METHODS = ("search", "minmax", "search-unscaled", "search-weighted", "gptq", "gptq-actorder")


def build_runner():
    from edgelm.model_config import ModelConfig
    from edgelm.model_executor.model_runner import ModelRunner
    from edgelm.model_loader.resolve import resolve_model
    from edgelm.server_args import ServerArgs

    # the unquantized reference: the GGUF's weights dequantized (served as stored, its 4-bit layers would already be
    # int4 and --torchao-config int4wo-* would find nothing left to quantize)
    args = ServerArgs(device="cpu", max_total_tokens=4096, max_running_requests=64, dequantize_gguf=True)
    config = ModelConfig.load(resolve_model(None), args.dtype, "cpu", args.context_length)
    return ModelRunner(args, config, "cpu"), config


def tokenizer_for(config):
    from transformers import AutoTokenizer

    src = config.source
    return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)


@torch.no_grad()
def all_logits(runner, token_lists: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len(prompt), vocab] (float32) of each prompt, all prompts in one prefill."""
    from edgelm.model_executor.forward_batch import ForwardBatch

    runner.allocator.clear()
    runner.req_to_token_pool.clear()
    reqs = [runner.req_to_token_pool.alloc() for _ in token_lists]
    slots = runner.allocator.alloc(sum(len(ids) for ids in token_lists))
    offset = 0
    for req, ids in zip(reqs, token_lists):
        runner.req_to_token_pool.write(req, 0, slots[offset : offset + len(ids)])
        offset += len(ids)
    batch = ForwardBatch.for_extend([t for ids in token_lists for t in ids], reqs, [0] * len(reqs),
                                    [len(ids) for ids in token_lists], slots, "cpu", return_all_logits=True)
    logits = runner.forward(batch).float()
    return list(logits.split([len(ids) for ids in token_lists]))


def input_importances(model) -> dict:
    """Per target linear, a data-free estimate of E[x_k²] for each of its inputs k, taking the RMSNorm's output as
    γ ⊙ z with z ~ N(0, I): γ² before qkv_proj and gate_up_proj; E[v²] (v = W_v (γ ⊙ z)) before o_proj, whose
    input is a mix of v rows; down_scale's channel RMS squared (computed on the scaled weights) before down_proj."""
    from edgelm.quantization import down_scale

    imp = {}
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        g_in = layer.input_layernorm.weight.float() ** 2
        g_post = layer.post_attention_layernorm.weight
        imp[att.qkv_proj], imp[mlp.gate_up_proj] = g_in, g_post.float() ** 2
        v0, vn = att.qkv_proj.shard_offsets["v"]
        ev = (att.qkv_proj.weight.data[v0 : v0 + vn].float() ** 2) @ g_in
        imp[att.o_proj] = ev.view(att.num_kv_heads, att.head_dim).repeat_interleave(
            att.num_heads // att.num_kv_heads, 0).reshape(-1)
        w = mlp.gate_up_proj.weight.data
        (g0, gn), (u0, un) = mlp.gate_up_proj.shard_offsets["gate"], mlp.gate_up_proj.shard_offsets["up"]
        imp[mlp.down_proj] = down_scale.channel_rms(w[g0 : g0 + gn], w[u0 : u0 + un], g_post) ** 2
    return imp


def quantize_weighted(model, group_size: int, only: str | None) -> int:
    """search-weighted: down_scale as int4wo does it, then each target quantized with input_importances."""
    from edgelm.quantization import down_scale
    from edgelm.quantization.int4_linear import Int4Linear
    from edgelm.quantization.torchao_config import _is_target

    if not only or only.endswith("down_proj"):
        down_scale.scale_mlps(model, lambda w: Int4Linear.quantize(w, group_size), _is_target, group_size)
    imp = input_importances(model)
    names = [name for name, mod in model.named_modules() if _is_target(mod) and (not only or name.endswith(only))]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        w = linear.weight.data
        setattr(parent, child, Int4Linear(Int4Linear.quantize(w, group_size, importance=imp[linear]), linear.bias,
                                          w.dtype))
    return len(names)


def quantize(model, config: str, method: str, hessians) -> None:
    from edgelm.quantization.torchao_config import INT4_GROUP_SIZES, apply_torchao_config, quantize_int4_model

    method, head8 = (method[:-len("+int8head")], True) if method.endswith("+int8head") else (method, False)
    if head8:
        from edgelm.quantization.int8_head import quantize_lm_head

        quantize_lm_head(model, "int8")
    method, _, only = method.partition("@")
    if config == "none":
        return
    if not config.startswith("int4wo-"):
        apply_torchao_config(model, config, "cpu")
    elif method == "search-weighted":
        if not quantize_weighted(model, INT4_GROUP_SIZES[config], only or None):
            raise SystemExit(f"quant_quality: {config}:{method} found no linear layer to quantize")
    elif method in ("search", "minmax", "search-unscaled"):
        unscaled = method == "search-unscaled"
        count = quantize_int4_model(model, INT4_GROUP_SIZES[config], "search" if unscaled else method, only or None,
                                    scale_down=not unscaled)
        if not count:
            raise SystemExit(f"quant_quality: {config}:{method} found no linear layer to quantize")
    else:
        from edgelm.quantization.gptq import gptq_quantize
        from edgelm.quantization.int4_linear import Int4Linear

        for name, hessian in hessians.items():
            if only and not name.endswith(only):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            packed = gptq_quantize(linear.weight.data, hessian, INT4_GROUP_SIZES[config],
                                   act_order=method == "gptq-actorder")
            setattr(parent, child, Int4Linear(packed, linear.bias, linear.weight.dtype))


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    agree = total = 0
    last_agree = 0
    kl_sum = 0.0
    for r, g in zip(ref, got):
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += r.shape[0]
        last_agree += int(r[-1].argmax() == g[-1].argmax())
        lp_r, lp_g = torch.log_softmax(r, -1), torch.log_softmax(g, -1)
        kl_sum += float((lp_r.exp() * (lp_r - lp_g)).sum())
    return {"top1_agreement_all_positions": agree / total, "top1_agreement_last_position": last_agree / len(ref),
            "mean_kl_all_positions": kl_sum / total, "positions": total, "prompts": len(ref)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="int4wo-128:search",
                        help="comma-separated CONFIG[:METHOD], METHOD in " + "|".join(INT4_METHODS))
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    runs = []
    for r in args.runs.split(","):
        head8 = "+int8head" if r.endswith("+int8head") else ""
        r = r[:len(r) - len(head8)]
        config, method = r.split(":") if ":" in r else (r, "torchao" if r != "none" else "head only")
        runs.append((config, method + head8))
    for config, method in runs:
        if config.startswith("int4wo-") and method.partition("@")[0].removesuffix("+int8head") not in INT4_METHODS:
            parser.error(f"unknown int4 method {method!r}")
    torch.manual_seed(0)
    runner, config_ = build_runner()
    tok = tokenizer_for(config_)
    token_lists = [tok(p)["input_ids"] for p in PROMPTS]
    ref = all_logits(runner, token_lists)
    hessians = None
    if any(m.startswith("gptq") for _, m in runs):
        from edgelm.quantization.gptq import HessianCollector
        from edgelm.quantization.torchao_config import _is_target

        collector = HessianCollector(runner.model, _is_target)
        all_logits(runner, [tok(c)["input_ids"] for c in CALIBRATION])
        collector.remove()
        hessians = collector.hessians
    original = runner.model
    results = []
    for config, method in runs:
        runner.model = copy.deepcopy(original)
        t0 = time.time()
        quantize(runner.model, config, method, hessians)
        row = {"config": config, "method": method, "quantize_seconds": round(time.time() - t0, 1),
               **compare(ref, all_logits(runner, token_lists))}
        print(json.dumps(row), flush=True)
        results.append(row)
    result = {"model": config_.source.display_name, "device": "cpu", "prompts": len(PROMPTS),
              "calibration_tokens": sum(len(tok(c)["input_ids"]) for c in CALIBRATION) if hessians else None,
              "results": results, "command": "PYTHONPATH=. python " + " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "machine": platform.machine()}
    if args.out:
        from edgelm.bench_utils import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
