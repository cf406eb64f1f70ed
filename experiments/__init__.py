"""Research experiments built on the ms_llava package (not installed with it). Run from the repository root."""
