"""edgelm's own Triton attention kernels (SM 8.0+: plain tl.dot, no Hopper-only features)."""

from edgelm.layers.attention.triton_ops.decode_attention import (
    DecodeConfig,
    decode_attention,
    decode_counters,
    default_decode_config,
    num_kv_splits,
)
from edgelm.layers.attention.triton_ops.extend_attention import (
    ExtendConfig,
    default_extend_config,
    extend_attention,
)
from edgelm.layers.attention.triton_ops.kv_write import store_kv

__all__ = [
    "DecodeConfig",
    "ExtendConfig",
    "decode_attention",
    "decode_counters",
    "default_decode_config",
    "default_extend_config",
    "extend_attention",
    "num_kv_splits",
    "store_kv",
]
