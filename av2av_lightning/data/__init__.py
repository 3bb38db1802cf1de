"""Data: the shard schema, decoding, features, noise, batching and the shared datamodule."""
