"""nora: LoRA finetuning with Nyström initialization (NoRA) and ScaledGD preconditioning (NoRA+)."""

__version__ = "0.1.0"
