"""The machine: devices, ranks, the compile cache, other processes, the Hugging Face hub."""
