"""Tasks: what differs between causal-LM finetuning and DreamBooth, each behind one Task record."""
