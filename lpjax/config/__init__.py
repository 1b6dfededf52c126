"""Configs: the base config and its checks, building an experiment from a config, optimizer settings, and
recipe files and their catalog. Import the submodules: this package stays light for the CLI."""
