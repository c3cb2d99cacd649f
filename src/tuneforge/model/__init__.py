"""Model: load a base model + tokenizer (HF dir, .gguf file, hub id); LoRA adapters via peft."""
