"""Recipes: runs that chain stages (``retrieval run``, the default model's training recipe). They sit
above the stages and import them; no stage imports a recipe."""
