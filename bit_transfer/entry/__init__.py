"""Entry scripts for launchers that run a file, not a module (msrun)."""
