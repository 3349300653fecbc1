"""Recipes: procedures that chain stages (the drivers layer, above the stages).

A stage (extract, fit, index, search, evaluate, report, train) never imports another stage's job
module nor a recipe; a recipe imports the stages it chains (tests/unit/test_architecture.py checks
both).

- :mod:`retrieval.recipes.run`: ``retrieval run``, the one command for one's own images: fit,
  extract (gallery, queries, background), index, normalised search, [evaluate], report on one engine;
  ``scripts/demo.sh`` is this command on the bundled sample.
- :mod:`retrieval.recipes.default_model`: the shipped default model: training images from the
  Debian photo packages, ``retrieval train`` with the recipe's settings, then ``retrieval fit``,
  exported as the packaged delta with its model card.
- :mod:`retrieval.recipes.background`: the background set ``retrieval run`` uses.
"""
