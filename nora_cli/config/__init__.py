"""The recipe: schema (schema.py), loading and overrides (load.py), the generated reference (reference.py)."""
