"""ScopeBench: the paper's projector table in miniature on generated images (see README.md here)."""
