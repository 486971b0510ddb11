"""Hybrid candidates (vector + BM25), ranking features, and the learned ranker."""
