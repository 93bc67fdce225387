"""Causal-LM finetuning: the training job, its fast CPU paths, export and verification."""
