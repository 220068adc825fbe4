"""The evaluate stage: measurements of the whole run, their rendering, and the terminal summary."""
