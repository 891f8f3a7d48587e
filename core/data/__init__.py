"""Datasets: read any common format, detect its shape, render turns with a chat template, tokenise for SFT or preference pairs, preview.

Modules: formats, pref, prepared, read, sft, tokenize, turns."""
