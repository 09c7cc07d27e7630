"""Benchmarks of deepseek-vl-hf against transformers' native DeepSeek-VL classes: `python -m bench`."""
