"""text2img: compose a language-model text encoder, a fusion head and a generator backend."""

__version__ = "0.1.0"
