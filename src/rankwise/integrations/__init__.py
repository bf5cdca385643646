"""Bridges to other libraries: PEFT adapter files, transformers Trainer callbacks."""
