"""`python -m edgelm.bench`: batch-1 decode, edgelm against transformers (see cpu_vs_hf)."""

from edgelm.bench.cpu_vs_hf import main

main()
