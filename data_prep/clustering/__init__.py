"""AV-HuBERT cluster targets: MFCC / layer features -> k-means -> label sidecars, and unit-quality metrics."""
