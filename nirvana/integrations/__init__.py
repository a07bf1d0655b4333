"""Adapters that let other pruning libraries use nirvana's scores.

Each submodule imports its library, so import the one you need (``nirvana.integrations.torch_pruning``
needs the ``[torch-pruning]`` extra); importing this package imports none of them.
"""
