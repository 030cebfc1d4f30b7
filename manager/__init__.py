"""The stream manager: declarations, API, CLI, reconciler and dispatchers."""
