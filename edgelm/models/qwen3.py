"""Qwen3 (dense): the Llama network with RMSNorm on each head of q and k, before rotary."""

from edgelm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True  # attention_bias comes from the config (false in Qwen3's)


EntryClass = [Qwen3ForCausalLM]
