"""The BiT-HyperRule (rule: pure functions of the data) and planning (recipe + data -> plan)."""
