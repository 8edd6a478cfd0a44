"""Evaluation: perplexity and bits per byte, classification metrics, SQuAD-style exact match and F1.

``lmforge evaluate MODEL --task perplexity|classify|squad --data FILE`` runs ``run.evaluate`` and prints a
table (``report``); ``--out FILE.json`` also writes the numbers as JSON.
"""
