"""Bundled strategies, one module per method. Each registers itself with :func:`tokencomp.register`."""
