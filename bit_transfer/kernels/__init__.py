"""Compiled CPU kernels: the builder, GroupNorm / weight standardisation / max-pool ops, oneDNN convolutions."""
