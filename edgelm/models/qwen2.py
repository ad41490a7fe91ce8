"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen): the Llama network with a bias on q/k/v."""

from edgelm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


EntryClass = [Qwen2ForCausalLM]
