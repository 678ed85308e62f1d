"""sieve: feature-level control of language models at generation time.

An intervention is detector × gate × edit on one layer's residual stream, applied inside nnsight
traces. The most used names are importable from here::

    from sieve import load_model, load_sae, feature, Intervention, Detector, Edit, Steerer, generate, build
"""

from sieve.errors import NotAvailableOffline, RecipeError, ShapeMismatch, SieveError
from sieve.generation import Completion, generate
from sieve.interventions import Detector, Edit, Intervention, Steerer, apply_edit, pack
from sieve.methods import METHODS, Method, Parts, build, get_method, register_method
from sieve.models import chat_prompt, encode_prompts, load_model
from sieve.recipe import Recipe, load_recipe, recipe_hash, save_recipe
from sieve.saes import Feature, feature, load_sae

__version__ = "0.1.0"

__all__ = [
    "Completion", "Detector", "Edit", "Feature", "Intervention", "METHODS", "Method", "NotAvailableOffline",
    "Parts", "Recipe", "RecipeError", "ShapeMismatch", "SieveError", "Steerer", "apply_edit", "build",
    "chat_prompt", "encode_prompts", "feature", "generate", "get_method", "load_model", "load_recipe",
    "load_sae", "pack", "recipe_hash", "register_method", "save_recipe",
]
