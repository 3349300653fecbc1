"""``retrieval remove``: takedowns of gallery images from an index (docs/lifecycle.md)."""
