"""magic-align: align diffusion models with expert checklists graded by a multimodal judge."""

__version__ = "0.1.0"
