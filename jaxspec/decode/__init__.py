"""Decoding: the fused loop (state, step, dynamic and static runners), sampling, the rejection
reference, statistics and buffer sizing. Imports nothing from `jaxspec.checkpoint` or the CLI."""
