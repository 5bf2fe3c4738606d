"""Pruning: magnitude, Wanda and SparseGPT (a share of zeros or an N:M pattern, SparseGPT optionally
joint with quantization), written dense or in compressed-tensors' sparse formats; and structured
pruning of MLP channels, key/value head groups and decoder layers."""
