"""A model organism on CPU: SmolLM2-135M-Instruct aligned, fine-tuned, attacked and repaired end to end."""

from safemerge.organism.build import Organism, build_organism
from safemerge.organism.recipe import OrganismRecipe, reduced_recipe

__all__ = ["Organism", "OrganismRecipe", "build_organism", "reduced_recipe"]
