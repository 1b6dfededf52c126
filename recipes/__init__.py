"""Training recipes: ``get_config()`` files for ``lpjax train --config NAME`` (installed as lpjax.recipes)."""
