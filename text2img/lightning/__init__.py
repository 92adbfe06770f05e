from text2img.lightning.adversarial import AdversarialModule
from text2img.lightning.datamodule import Text2ImgDataModule
from text2img.lightning.module import Text2ImgModule
from text2img.lightning.webdataset import WebDataModule

__all__ = ["AdversarialModule", "Text2ImgDataModule", "Text2ImgModule", "WebDataModule"]
