"""Rewriting captions before they are encoded."""

from text2img.prompts.expansion import PromptExpander

__all__ = ["PromptExpander"]
