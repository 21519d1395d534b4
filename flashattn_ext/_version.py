# Single source of the package version; setup.py reads this file as text (no import of torch at build time).
__version__ = "0.1.0"
