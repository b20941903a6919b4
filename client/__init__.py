"""The on-device side: ClientApp, DP-LoRA trainer, device store."""

import warnings

# Opacus's hooks on a frozen base model trigger this PyTorch notice on every step;
# it is expected here (inputs never require grad) and says nothing about privacy.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
