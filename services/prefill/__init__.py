"""The prefill stage: runs prompts and hands their KV pages to a decode worker."""
