"""detox-sft: detoxify fine-tuning data with TrustyAI TMaRCo, QLoRA-tune a model on it, measure, serve.

Importing the package has no side effects; the heavy libraries load inside the functions that need them.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
