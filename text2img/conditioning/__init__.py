"""The text side of a run as one object, `TextConditioner`, owned by the LightningModule."""

from text2img.conditioning.conditioner import (
    SEED_DRAWS,
    CaptionSets,
    Prompts,
    Shared,
    TextConditioner,
    TextTable,
    caption_draws,
    upgrade_state_dict,
    upgraded_key,
)

__all__ = [
    "SEED_DRAWS", "CaptionSets", "Prompts", "Shared", "TextConditioner", "TextTable", "caption_draws",
    "upgrade_state_dict", "upgraded_key",
]
