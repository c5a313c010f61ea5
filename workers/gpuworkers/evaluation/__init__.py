"""Evaluation attempts: score base, fine-tuned and compressed models on one file."""
