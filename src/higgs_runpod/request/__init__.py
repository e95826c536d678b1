"""What a caller asks for: the request schemas, voices, prompts and text chunks."""
