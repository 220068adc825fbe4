"""The methods' formulas: losses, prototypes, pseudo-label selection, metrics (torch and numpy, no params
objects). Two classes also read and write their own files: the prototype bank and the per-class IoU CSV."""
