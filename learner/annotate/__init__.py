"""The annotator sidecar: follows the generation log and labels generations with providers."""
