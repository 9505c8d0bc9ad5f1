"""Training and evaluation input: the seeded resumable data order, Ray Data shard reads, collate."""
