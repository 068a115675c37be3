"""Shared utilities below every other layer: errors, atomic output directories, YAML configs, packaged
data, datasets shared by training and evaluation, and statistics. Imports nothing else from safemerge."""
