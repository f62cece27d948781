"""Models shipped with moeq (see moeq.models.loader.ZOO)."""
