"""sieve: feature-level control of language models at generation time.

An intervention is detector × gate × edit, bound to the layer(s) it acts on, applied inside nnsight
traces. The most used names are importable from here::

    from sieve import load_model, load_sae, feature, Intervention, Detector, Edit, Steerer, generate, build
    from sieve import generate_forked   # the same completions, only the work gates cause
    from sieve import steering, from_feature, SAECode, LatentEdit, Fires
"""

from sieve import steering  # the module, callable as its steering(): sieve.steering(model, iv)
from sieve.errors import NotAvailableOffline, RecipeError, ShapeMismatch, SieveError
from sieve.fork import ForkSummary, generate_forked
from sieve.generation import Completion, generate
from sieve.interventions import (
    Always,
    Detector,
    Edit,
    Fires,
    Intervention,
    LatentEdit,
    SAECode,
    Steerer,
)
from sieve.methods import METHODS, Method, Parts, build, get_method, register_method
from sieve.models import chat_prompt, encode_prompts, load_model
from sieve.recipe import Recipe, load_recipe, recipe_hash, save_recipe
from sieve.saes import Feature, feature, load_sae
from sieve.steering import from_feature

__version__ = "0.1.0"

__all__ = [
    "Always", "Completion", "Detector", "Edit", "Feature", "Fires", "ForkSummary", "Intervention", "LatentEdit", "METHODS",
    "Method", "NotAvailableOffline", "Parts", "Recipe", "RecipeError", "SAECode", "ShapeMismatch", "SieveError",
    "Steerer", "build", "chat_prompt", "encode_prompts", "feature", "generate", "generate_forked", "get_method",
    "load_model",
    "from_feature", "load_recipe", "load_sae", "recipe_hash", "register_method", "save_recipe", "steering",
]
