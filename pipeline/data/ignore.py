"""The one ignore index of every train-ID label map in the pipeline.

A module of its own, importing nothing, so the torch-only maths modules (losses, metrics, prototypes) share
it with the data side without importing the label definitions.
"""

IGNORE_INDEX = 255
