"""Plain ``nn.Module`` models (no Lightning): building blocks and the per-stage networks."""
