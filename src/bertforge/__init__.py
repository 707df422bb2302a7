"""bertforge: from your own text corpus to a pretrained BERT model for transformers and flair."""

__version__ = "0.1.0"
