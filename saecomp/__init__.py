"""saecomp: can an SAE trained on a language model still explain it after the model is pruned?"""

import os

# Progress bars of datasets/transformers on every tiny save drown our own progress lines.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("WANDB_MODE", "disabled")  # SAELens imports wandb; nothing here logs to it

__version__ = "0.1.0"
