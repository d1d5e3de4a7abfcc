"""wikigpt: fine-tune a GPT-2-family model on WikiText, measure it, serve it."""

__version__ = "0.1.0"
