"""lidc."""
