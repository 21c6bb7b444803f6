"""Hugging Face import and export: config and parameter-name maps per family, safetensors only."""
