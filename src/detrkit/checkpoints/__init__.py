"""Checkpoints: reading, writing and converting every DETR format (detrkit, original, Hugging Face), and downloads."""
