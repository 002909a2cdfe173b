"""Supervised fine-tuning, and rejection-sampling fine-tuning with `include_generated` (`algorithm`)."""
