"""The live catalog: the served index plus the store's changes since it was built (catalog),
exact filters (filters), following the store's change log (follower), fresh labels for
`select` (labels), compaction into a new base index (compaction), and where the store is
(location)."""
