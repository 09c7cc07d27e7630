"""The end-to-end demo: synthetic data (`synthetic`), stage 0 (`warmup`), the paper's stages 1-3 and the run
(`pipeline`), held-out evaluation (`evaluate`) and the report (`report`). Importing this package stays light
(no torch), so `deepseek-vl-hf --help` is fast."""

DEFAULT_MINUTES = 7.0
ABLATIONS = ("modality-mix", "hybrid")
