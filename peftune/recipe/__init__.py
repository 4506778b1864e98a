"""Recipes: the typed schema, YAML loading (`yamlfile`: line numbers, `extends:`, dotted
overrides, `file:line` errors) and the `peftune validate` report. Torch-free, so `peftune
validate` starts in a blink. What is known of the model a recipe names comes from the caller
(`model_facts`)."""

from peftune.recipe.describe import derived_numbers, describe_recipe, estimate_parameters
from peftune.recipe.loader import load_recipe, recipe_to_yaml
from peftune.recipe.schema import Recipe, cross_field_problems

__all__ = [
    "Recipe",
    "estimate_parameters",
    "cross_field_problems",
    "derived_numbers",
    "describe_recipe",
    "load_recipe",
    "recipe_to_yaml",
]
