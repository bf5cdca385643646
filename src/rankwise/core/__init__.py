"""Method-agnostic machinery: the adapter contract, targeting, the registry and adapter files.

Nothing in this package imports a method; methods import it.
"""
