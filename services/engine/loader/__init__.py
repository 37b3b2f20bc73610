"""Weight loaders: HF directories, GGUF files and named dummy shapes."""
