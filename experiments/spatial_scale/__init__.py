"""The ScAle spatial-relation experiment: frozen model vs ScAle vs LoRA (see README.md here)."""
