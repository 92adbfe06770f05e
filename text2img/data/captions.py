"""Emoji names -> plain English captions.

Rules (`caption_from_name`), applied in order:
1. Unicode NFC; the `:name:` delimiters are dropped and underscores become spaces
   (`:man_running_facing_right:` -> "man running facing right").
2. A CLDR-style "flag: X" becomes "flag of X"; any other colon separating a category from its
   detail becomes a space ("keycap: #" -> "keycap #").
3. Typographic quotes become ASCII ("o\u2019clock" -> "o'clock").
4. Letters (accents included), digits and the punctuation that carries meaning in emoji names are
   kept: ' - . , & ! ( ) # * ("Côte d'Ivoire", "T-Rex", "St. Lucia", "UP! button", "keycap *");
   anything else is noise and dropped. Whitespace is collapsed.
5. Skin-tone modifiers are set off by commas as in CLDR names
   ("woman, medium-dark skin tone, blond hair").
6. Case is kept as the name has it: names are lowercase except proper nouns and acronyms
   ("Japan", "OK hand", "SOS button"), which a language-model encoder reads better capitalised.

The `emoji` package names country and subdivision flags by the place alone (`:Japan:`);
`emoji_caption` adds the missing "flag of" for them.
"""

from __future__ import annotations

import re
import unicodedata

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
# Characters that are not a letter, digit, space or meaningful punctuation (rule 4).
_NOISE = re.compile(r"[^\w\s'\-.,&!()#*]|_")
_FLAG_PREFIX = re.compile(r"^flag\s*:\s*", re.IGNORECASE)
_SKIN_TONE = r"(?:medium-)?(?:light|medium|dark)(?:-light|-dark)? skin tone"
_BEFORE_SKIN_TONE = re.compile(rf",?\s+(?={_SKIN_TONE})")
_AFTER_SKIN_TONE = re.compile(r"(?<=skin tone),?\s+(?=\w)")

_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F1FF + 1)
_TAG_CHARACTERS = range(0xE0020, 0xE007F + 1)
_BLACK_FLAG = 0x1F3F4


def caption_from_name(name: str) -> str:
    """A readable caption from an emoji name such as `:man_running_facing_right:` or "flag: Japan"."""
    text = unicodedata.normalize("NFC", name).strip().strip(":").replace("_", " ")
    text = _FLAG_PREFIX.sub("flag of ", text)
    text = text.replace(":", " ").translate(_QUOTES)
    text = " ".join(_NOISE.sub(" ", text).split())
    return _AFTER_SKIN_TONE.sub(", ", _BEFORE_SKIN_TONE.sub(", ", text))


def is_flag(emoji: str) -> bool:
    """Whether `emoji` is a country flag (regional-indicator pair) or subdivision flag (black flag + tags)."""
    codepoints = [ord(c) for c in emoji]
    if len(codepoints) == 2 and all(cp in _REGIONAL_INDICATORS for cp in codepoints):
        return True
    return (
        len(codepoints) > 2
        and codepoints[0] == _BLACK_FLAG
        and all(cp in _TAG_CHARACTERS for cp in codepoints[1:])
    )


def emoji_caption(emoji: str, name: str) -> str:
    """The caption of `emoji` given its name; flags named by place alone get "flag of" in front."""
    if is_flag(emoji) and not _FLAG_PREFIX.match(name.strip(":")):
        name = f"flag: {name.strip(':')}"
    return caption_from_name(name)
