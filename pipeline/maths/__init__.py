"""The method's formulas (losses, prototypes, metrics): torch only, no files, no parameters objects."""
