"""Code both sides use: configuration, model and data loading, adapters, the pure core."""

import os

# Nothing may download at run time: transformers and peft consult the Hub when a
# name looks like a repo id (peft does so while collecting adapter weights).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
