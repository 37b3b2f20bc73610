"""Quantized weights: formats, the quantized linear layers, calibration (AWQ, FP8 KV scales) and quality eval."""
