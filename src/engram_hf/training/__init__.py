"""Training helpers for EngramMoE with the HF stack."""

from .callbacks import RouterBiasCallback
from .data import PackedBlocks, pack_texts
from .plots import plot_loss_curve
from .tokenizer import train_bpe_tokenizer

__all__ = ["RouterBiasCallback", "PackedBlocks", "pack_texts", "plot_loss_curve", "train_bpe_tokenizer"]
