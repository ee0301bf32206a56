"""Reading a Hugging Face checkpoint folder: its facts, and its weights into a built model."""
