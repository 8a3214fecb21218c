"""Choosing what to annotate: coverage-based greedy selection (CGS, DESIGN §2 "Selection").

The numerics live here as pure functions over a grid of patch embeddings: :mod:`.cover`
(nearest neighbours and what each patch covers), :mod:`.greedy` (CGS and the random and
k-means++ baselines at the same budget, and the coverage score of any choice).
"""
