"""nora: LoRA finetuning with Nyström initialization (NoRA) and ScaledGD preconditioning (NoRA+)."""

import warnings

__version__ = "0.1.0"

# Library noise a nora user cannot act on, filtered by exact message so that every other warning still shows:
# PEFT reads transformers' deprecated `is_gradient_checkpointing` each time it wraps a model.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
