"""Thin model package shared by the pi_RL scripts (which hold the RL): build, load and save pi0 / pi0.5 policies."""

from .checkpoint import CheckpointError, load_checkpoint, load_pretrained, openpi_to_ours, save_checkpoint
from .model import PRESETS, Prefix, VLAConfig, VLAPolicy, build
from .normalize import Normalizer
