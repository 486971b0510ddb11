"""Recommendation from shoppers' events: the event log's statistics (`interactions`), candidates
and features for a user or a product (`candidates`), the learned ranker's training
(`training`), purchase histories from a transactions file (`transactions`) and the replay
evaluation (`evaluation`). Serving adapters live in ecomsearch.serving."""
