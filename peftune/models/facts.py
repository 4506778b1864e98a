"""What `load_recipe` and `describe_recipe` need to know of the model a recipe names,
found without loading it (`peftune.recipe.model_facts`): every caller of those passes
`inspect_model`. Not imported by `peftune.models` itself: the recipe package it imports
leads back to `peftune.models.sources`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftune.models.sources import local_config_dir, model_source_problem
from peftune.recipe.model_facts import ModelFacts, local_model_facts

if TYPE_CHECKING:
    from peftune.recipe.schema import ModelSection


def inspect_model(model: ModelSection) -> ModelFacts:
    """`local_model_facts` (a model directory: pickle-only weights) plus what the sources
    know: a missing or unreadable .gguf, an unknown catalogue name, a file that is no model,
    and the config.json of a GGUF or catalogue model converted earlier."""
    source = model_source_problem(model.path)
    return ModelFacts(config_dir=local_config_dir(model.path),
                      problems=local_model_facts(model).problems + ((source,) if source else ()))
