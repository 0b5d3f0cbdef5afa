"""What every step runs on: atomic file writes and output folders (``atomic``), the torch device (``device``)."""
