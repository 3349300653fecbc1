"""Recipes: procedures that chain stages (the drivers layer, above the stages).

A stage (extract, fit, index, search, evaluate, report, train) never imports another stage's job
module nor a recipe; a recipe imports the stages it chains (tests/unit/test_architecture.py checks
both).

- :mod:`retrieval.recipes.default_model`: the shipped default model: training images from the
  Debian photo packages, ``retrieval train`` with the recipe's settings, then ``retrieval fit``,
  exported as the packaged delta with its model card.

The end-to-end demo (sample -> fit -> extract -> index -> search -> evaluate -> report) is a recipe
too, written against the command line: ``scripts/demo.sh``.
"""
