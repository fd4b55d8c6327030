"""Objective plugins. Each module registers one objective with ``maskray.objective.register_objective``."""
