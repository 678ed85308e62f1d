"""``python -m recipes``: list the recipes and the shipped recipe files."""

from __future__ import annotations

from recipes import RECIPES, declared_methods, recipe_files


def main() -> None:
    print("recipes (python -m recipes.NAME [RECIPE.toml] [key=value ...]):")
    for name, (_, what) in RECIPES.items():
        print(f"  {name:8s} {what}")
    print("\nrecipe files (recipes/*.toml):")
    for fname, name, desc in recipe_files():
        print(f"  {fname:26s} {name:16s} {desc}")
    declared = declared_methods()
    if declared:
        print("\nmethods declared in recipe files ([methods.NAME]):")
        for fname, name, desc in declared:
            print(f"  {fname:26s} {name:24s} {desc}")


if __name__ == "__main__":
    main()
