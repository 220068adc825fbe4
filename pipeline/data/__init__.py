"""Data: label definitions, datasets from manifests, joint image/label views, the embedded generator."""
