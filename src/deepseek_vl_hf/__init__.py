"""deepseek-vl-hf: DeepSeek-VL as a Hugging Face Transformers-native package."""

__version__ = "0.1.0"
