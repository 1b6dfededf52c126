"""Sweep suites: ``get_config()`` files for ``lpjax bench --suite NAME`` (installed as lpjax.recipes.sweeps)."""
