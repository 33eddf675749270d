"""The core model: config, decoder, sharding, weights, tokenizer, prompts,
decoding, encoding and the CPU kernels. Imports nothing above it."""
