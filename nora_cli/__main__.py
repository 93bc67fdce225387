"""`python -m nora_cli ...` (what `accelerate launch -m nora_cli train ...` runs on every rank)."""

from nora_cli.cli import main

if __name__ == "__main__":
    main()
