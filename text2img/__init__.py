"""text2img: compose a language-model text encoder, a fusion head and a generator backend."""

__version__ = "0.1.0"

from text2img.run.resolvers import register_resolvers

register_resolvers()  # ${weights_dtype:...}, ${launch_dir:} in configs
