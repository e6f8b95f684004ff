"""Few-shot sweeps: fine-tuned or linear-probe runs over (shots, seed), the feature cache, the summary."""
