"""The frozen base model (embedded GGUF, a local directory or the tiny test model), its
three LoRA levels, language-model losses, and the per-process runtime that holds them."""
