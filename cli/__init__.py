"""The ``lidcseg`` command line: thin Typer commands over the :mod:`lidcseg` API.

Installed as the package ``lidcseg_cli``; :mod:`lidcseg` never imports it.
"""
