"""Training helpers for EngramMoE with the HF stack."""

from .callbacks import RouterBiasCallback
from .data import PackedBlocks, pack_texts, read_texts, texts_from_dataset
from .lora import LORA_TARGETS, lora_config
from .plots import plot_loss_curve
from .run import TrainSpec, build_model, run_training
from .tokenizer import train_bpe_tokenizer
from .trainer import EngramTrainer

__all__ = [
    "RouterBiasCallback",
    "EngramTrainer",
    "PackedBlocks",
    "pack_texts",
    "read_texts",
    "texts_from_dataset",
    "LORA_TARGETS",
    "lora_config",
    "plot_loss_curve",
    "TrainSpec",
    "build_model",
    "run_training",
    "train_bpe_tokenizer",
]
