"""RQ workers: load checkpoints once, run certification jobs (JSON in, JSON out)."""
