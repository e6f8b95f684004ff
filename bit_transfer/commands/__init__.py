"""The commands (fit, eval, fewshot, predict, export): the only layer that claims a run directory."""
