"""Relevance evaluation against graded judgments (`ecomsearch eval`)."""
